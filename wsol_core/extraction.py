"""Pseudo-box extraction, the first stage of C2AM Sec. 3.4: one box per sample of a split from a
trained model's maps, written to a sidecar (:mod:`wsol_core.data.pseudo_boxes`).

The map is the method's own localization map: the class-agnostic map of a co-localization method
(CAML, C2AM; ``uses_labels`` False) or, for a method with a classifier, the CAM of the sample's
GT class, as GT-known Loc reads it. Each map goes through the protocol's preparation (224x224
bicubic, min-max, ``uint8(map * 255)``) and is thresholded at ``int(t * 255)``; the box is the
largest contour's (the box GT-known Loc scores), mapped back to the original image's pixels with
inclusive corners (:func:`wsol_core.localize.to_original`). Images are read by the evaluation
loader (the protocol's resize to 224x224), so the boxes are the ones the evaluator would draw.

This module runs one rank's share in one process; ``wsol-extract-boxes`` spreads the ranks over
Ray Train workers. Resuming: keys already in the rank's box file are not inferred again (their
images are still read, to keep the shard order and to score the boxes against GT).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from wsol_core.data.contract import LoaderOptions
from wsol_core.data.pseudo_boxes import CORLOC_IOU, PseudoBox, SidecarWriter, read_boxes
from wsol_core.localize import boxes_at
from wsol_core.methods import WSOLMethod
from wsol_core.metrics import prepare_float_maps
from wsol_core.metrics.reference import reference_iou

SUMMARY_PATTERN = "summary-rank{rank}-of-{world}.json"


@dataclass
class ExtractionSummary:
    """One rank's counts (or, merged, the whole split's)."""

    images: int = 0  # samples of this rank's share that were read (padding excluded)
    extracted: int = 0  # boxes inferred and written by this run
    resumed: int = 0  # boxes already in the file from an interrupted run (not inferred again)
    skipped: int = 0  # corrupt samples the loader skipped (``data.skip_corrupt``), never boxed
    skipped_examples: list[str] = field(default_factory=list)
    with_gt: int = 0  # samples with at least one GT box, the base of the quality figures
    corloc_hits: int = 0  # of those, boxes with IoU >= 0.5 against some GT box
    iou_sum: float = 0.0  # sum of the best IoU per sample with GT
    seconds: float = 0.0
    images_per_s: float = 0.0  # boxes inferred per second of this run (resumed ones excluded)

    def quality(self) -> dict[str, float]:
        """CorLoc and mean best IoU (percent) over the samples with GT boxes."""
        if self.with_gt == 0:
            return {"corloc": float("nan"), "mean_iou": float("nan"), "images": 0.0}
        return {
            "corloc": 100.0 * self.corloc_hits / self.with_gt,
            "mean_iou": 100.0 * self.iou_sum / self.with_gt,
            "images": float(self.with_gt),
        }


def merge_summaries(parts: list[ExtractionSummary]) -> ExtractionSummary:
    merged = ExtractionSummary()
    for part in parts:
        for name in ("images", "extracted", "resumed", "skipped", "with_gt", "corloc_hits"):
            setattr(merged, name, getattr(merged, name) + getattr(part, name))
        merged.iou_sum += part.iou_sum
        merged.skipped_examples += part.skipped_examples
        merged.seconds = max(merged.seconds, part.seconds)  # the ranks run side by side
    merged.images_per_s = merged.extracted / max(merged.seconds, 1e-9)
    return merged


def read_summaries(out: str | Path) -> list[ExtractionSummary]:
    return [ExtractionSummary(**json.loads(p.read_text())) for p in sorted(Path(out).glob("summary-rank*-of-*.json"))]


@torch.no_grad()
def boxes_for_batch(
    method: WSOLMethod, images: torch.Tensor, labels: torch.Tensor, sizes: list[tuple[int, int]], threshold: float
) -> list[tuple[int, int, int, int]]:
    """The largest-contour box at ``threshold`` of each image's map, in its original pixels."""
    maps = method.inference(images, labels if method.uses_labels else None).maps
    quantized = (prepare_float_maps(maps.float()) * 255).to(torch.uint8).cpu().numpy()  # as localize writes them
    out = []
    for i, (width, height) in enumerate(sizes):
        box, _ = boxes_at(quantized[i], threshold, width, height)
        x0, y0, x1, y1 = box
        out.append((x0, y0, x1, y1))
    return out


def extract_shards(
    method: WSOLMethod,
    split_dir: str | Path,
    out: str | Path,
    *,
    threshold: float,
    device: torch.device,
    options: LoaderOptions,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> ExtractionSummary:
    """Extract this rank's share of ``split_dir`` into ``out`` (whose header the caller wrote);
    returns the rank's summary, also written as ``summary-rank<r>-of-<w>.json`` in ``out``."""
    from tqdm import tqdm

    from wsol_core.data.loader import build_loader

    loader = build_loader(
        split_dir,
        split_kind="eval",
        rank=rank,
        world_size=world_size,
        device=device,
        options=options,
        batch_size=batch_size,
    )
    summary = ExtractionSummary()
    start = time.perf_counter()
    with SidecarWriter(out, rank, world_size) as writer:
        earlier = read_boxes(out) if writer.done else {}
        bar = tqdm(total=len(loader), unit="batch", disable=not progress, desc=f"extract rank {rank}")
        for batch in loader:
            keep = batch.real_indices()
            todo = [i for i in keep if batch.keys[i] not in writer.done]
            found: dict[str, PseudoBox] = {}
            if todo:
                sizes = [(int(batch.orig_sizes[i, 0]), int(batch.orig_sizes[i, 1])) for i in todo]
                images = batch.images[todo].to(device)
                labels = batch.labels[todo].to(device)
                corners = boxes_for_batch(method, images, labels, sizes, threshold)
                for i, (width, height), corner in zip(todo, sizes, corners):
                    found[batch.keys[i]] = PseudoBox(batch.keys[i], corner, width, height)
                writer.add(found[batch.keys[i]] for i in todo)  # flushed: a kill loses at most this batch
            summary.images += len(keep)
            summary.extracted += len(todo)
            summary.resumed += len(keep) - len(todo)
            for i in keep:
                truth = batch.boxes[i, : int(batch.num_boxes[i])].cpu().numpy()
                pseudo = found.get(batch.keys[i]) or earlier.get(batch.keys[i])
                if pseudo is None or not len(truth):
                    continue
                best = float(reference_iou(np.asarray([pseudo.box]), truth.astype(np.int64)).max())
                summary.with_gt += 1
                summary.corloc_hits += int(best >= CORLOC_IOU)
                summary.iou_sum += best
            bar.update(1)
        bar.close()
    summary.skipped = loader.skipped.total
    summary.skipped_examples = [f"{Path(shard).name}:{key}: {reason}" for shard, key, reason in loader.skipped.examples]
    summary.seconds = time.perf_counter() - start
    summary.images_per_s = summary.extracted / max(summary.seconds, 1e-9)
    path = Path(out) / SUMMARY_PATTERN.format(rank=rank, world=world_size)
    path.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


@torch.no_grad()
def compare_boxes(
    models: dict[str, tuple[WSOLMethod, float]],
    split_dir: str | Path,
    *,
    options: LoaderOptions,
    count: int = 8,
    device: torch.device | None = None,
):
    """A figure of the first ``count`` images of ``split_dir`` with their GT boxes and each named
    model's box (``{name: (method, threshold)}``), all in the 224 evaluation frame
    (:func:`wsol_core.viz.box_comparison_grid`); for MLflow."""
    from wsol_core.data.loader import build_loader
    from wsol_core.metrics.preparation import rescale_boxes
    from wsol_core.viz import box_comparison_grid, denormalize

    device = device or torch.device("cpu")
    loader = build_loader(split_dir, split_kind="eval", device=device, options=options, batch_size=count)
    batch = next(iter(loader)).to(device)
    take = min(count, len(batch))
    images, labels = batch.images[:take], batch.labels[:take]
    grid = [(224, 224)] * take  # boxes straight in the 224 frame: the map's own pixels
    drawn = {
        name: [np.asarray([box]) for box in boxes_for_batch(method, images, labels, grid, threshold)]
        for name, (method, threshold) in models.items()
    }
    gt = [b.cpu().numpy() for b in rescale_boxes(batch.gt_boxes_list()[:take], batch.orig_sizes[:take])]
    return box_comparison_grid(denormalize(images), gt, drawn, titles=list(batch.keys[:take]))


__all__ = [
    "ExtractionSummary",
    "boxes_for_batch",
    "compare_boxes",
    "extract_shards",
    "merge_summaries",
    "read_summaries",
]
