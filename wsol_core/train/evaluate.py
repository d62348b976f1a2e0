"""Scoring a split with the protocol's metrics, distributed without moving maps between ranks.

Each rank runs the method's inference path on its share of the split, turns maps into
per-threshold correct counts (:class:`~wsol_core.metrics.MaxBoxAccumulator`), and the small
count tensor is all-reduced; classification accuracy likewise. Rank 0 alone draws the pictures
of the first few images it scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure

from wsol_core.config import EvalConfig
from wsol_core.data.batch import Batch
from wsol_core.methods import WSOLMethod
from wsol_core.metrics import BoxAccuracy, MaxBoxAccumulator, prepare_maps, rescale_boxes
from wsol_core.viz import cam_overlay_grid, component_boxes, denormalize, threshold_curves


@dataclass
class EvalOutcome:
    metrics: dict[str, float]
    accuracy: BoxAccuracy
    overlay: Figure | None = None
    curves: Figure | None = None
    extra: dict = field(default_factory=dict)


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def box_coverage(boxes: list[torch.Tensor], orig_sizes: torch.Tensor, size: tuple[int, int], device) -> torch.Tensor:
    """The share of each cell of an ``h x w`` map that lies inside any GT box, ``[B, h, w]``.

    Boxes go to the protocol's 224 grid (:func:`rescale_boxes`, inclusive corners), are painted
    there and area-pooled to the map's size, so a cell on a box edge counts by its covered part."""
    scaled = rescale_boxes(boxes, orig_sizes)
    painted = torch.zeros(len(scaled), 1, 224, 224, device=device)
    for i, image_boxes in enumerate(scaled):
        for x0, y0, x1, y1 in image_boxes.tolist():
            painted[i, 0, max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = 1.0
    return F.adaptive_avg_pool2d(painted, size)[:, 0]


class MaskStatistics:
    """Per loss mask: its area (mean value) and the share of it inside the GT boxes, summed over
    images and all-reduced; a degenerate mask (empty, everywhere, or off the object) shows here."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # name -> [mask mass, mass inside boxes, cells]

    def update(self, masks: dict[str, torch.Tensor], batch: Batch, keep: torch.Tensor) -> None:
        if not masks:
            return
        first = next(iter(masks.values()))
        gt = [batch.gt_boxes_list()[i] for i in keep.tolist()]
        coverage = box_coverage(gt, batch.orig_sizes[keep], tuple(first.shape[-2:]), first.device)
        for name, mask in masks.items():
            m = mask.detach().float()[keep]
            cov = coverage if m.shape[-2:] == coverage.shape[-2:] else box_coverage(gt, batch.orig_sizes[keep], tuple(m.shape[-2:]), m.device)
            row = torch.stack([m.sum(), (m * cov).sum(), torch.tensor(float(m.numel()), device=m.device)]).double()
            self.sums[name] = self.sums.get(name, torch.zeros(3, dtype=torch.float64, device=m.device)) + row

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {}
        for name in sorted(self.sums):
            mass, inside, cells = _all_reduce(self.sums[name]).tolist()
            out[f"{prefix}mask_{name}_area"] = mass / max(cells, 1.0)
            out[f"{prefix}mask_{name}_in_box"] = inside / mass if mass > 0 else 0.0
        return out


@torch.no_grad()
def evaluate_split(
    method: WSOLMethod,
    loader,
    cfg: EvalConfig,
    *,
    split: str,
    draw: bool = False,
    loc_threshold_index: int | None = None,
    progress: float = 1.0,
) -> EvalOutcome:
    """Protocol metrics of ``method`` on ``loader`` (every rank calls this; all get the result).

    ``loc_threshold_index`` fixes the threshold at which GT-known / Top-k Loc are read (the one
    chosen on val, when scoring test); by default it is this split's best for IoU 0.5.

    Also, on the first ``cfg.mask_stat_images`` images of each rank, the method's training
    forward (at ``progress``, in eval mode) gives its loss masks, logged as
    ``<split>/mask_<name>_area`` and ``<split>/mask_<name>_in_box``; with
    ``cfg.compare_inference_maps`` every alternative inference map is scored too
    (``<split>/maxboxacc_v2_map_<name>``).
    """
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    thresholds = np.arange(0, 1, cfg.cam_curve_interval)
    accumulator = MaxBoxAccumulator(thresholds, cfg.iou_thresholds, device=device)
    class_counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    vis: dict[str, list] = {"images": [], "maps": [], "gt": [], "titles": []}
    mask_stats = MaskStatistics()
    variants: dict[str, MaxBoxAccumulator] = {}
    mask_images = 0
    for batch in loader:
        batch: Batch = batch.to(device)
        real = ~batch.is_padding if batch.is_padding is not None else torch.ones(len(batch), dtype=torch.bool, device=device)
        labels = batch.labels if method.uses_labels else None
        result = method.inference(batch.images, labels)
        keep = real.nonzero().squeeze(1)
        maps = result.maps.float()[keep]
        gt = [b for b, r in zip(batch.gt_boxes_list(), real.tolist()) if r]
        sizes = batch.orig_sizes[keep]
        labeled = bool((batch.labels[keep] >= 0).all()) and result.logits is not None
        scores = result.logits.float()[keep] if labeled else None
        accumulator.update_raw(maps, gt, sizes, class_scores=scores, labels=batch.labels[keep] if labeled else None)
        if cfg.compare_inference_maps:
            for name, variant_maps in method.inference_variants(batch.images, labels).items():
                if name not in variants:
                    variants[name] = MaxBoxAccumulator(thresholds, cfg.iou_thresholds, device=device)
                variants[name].update_raw(variant_maps.float()[keep], gt, sizes)
        if mask_images < cfg.mask_stat_images and type(method).loss_masks is not WSOLMethod.loss_masks:
            mask_stats.update(method.loss_masks(method(batch.images, batch.labels, progress)), batch, keep)
            mask_images += len(keep)
        if labeled:
            top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits = top5 == batch.labels[keep, None]
            class_counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(keep), device=device)]).double()
        if draw and len(vis["images"]) < cfg.num_vis_images:
            take = keep[: cfg.num_vis_images - len(vis["images"])]
            vis["images"].extend(denormalize(batch.images[take]))
            vis["maps"].extend(prepare_maps(result.maps.float()[take]).cpu().numpy())
            vis["gt"].extend(rescale_boxes([batch.gt_boxes_list()[i] for i in take.tolist()], batch.orig_sizes[take]))
            vis["titles"].extend(batch.keys[i] for i in take.tolist())

    accumulator.load_state_tensor(_all_reduce(accumulator.state_tensor()))
    _all_reduce(class_counts)
    accuracy = accumulator.compute(loc_threshold_index)
    metrics = accuracy.as_dict(prefix=f"{split}/")
    if not method.uses_labels and accuracy.gt_known_loc is not None:
        metrics[f"{split}/corloc"] = accuracy.gt_known_loc
    metrics.update(mask_stats.metrics(f"{split}/"))
    for name in sorted(variants):
        variants[name].load_state_tensor(_all_reduce(variants[name].state_tensor()))
        metrics[f"{split}/maxboxacc_v2_map_{name}"] = variants[name].compute().max_box_acc_v2
    top1, top5, images = class_counts.tolist()
    if images > 0:
        metrics[f"{split}/top1_acc"] = 100.0 * top1 / images
        metrics[f"{split}/top5_acc"] = 100.0 * top5 / images

    outcome = EvalOutcome(metrics=metrics, accuracy=accuracy)
    if draw and accuracy.num_images:
        outcome.curves = threshold_curves(accuracy.thresholds, accuracy.curves, accuracy.best_threshold)
        if vis["images"]:
            threshold = accuracy.best_threshold[50 if 50 in accuracy.iou_deltas else accuracy.iou_deltas[0]]
            predicted = [component_boxes(m, threshold) for m in vis["maps"]]
            outcome.overlay = cam_overlay_grid(np.stack(vis["images"]), np.stack(vis["maps"]), [g.numpy() for g in vis["gt"]], predicted, vis["titles"])
    method.train(was_training)
    return outcome
