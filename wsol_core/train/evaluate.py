"""Scoring a split with the protocol's metrics, distributed without moving maps between ranks.

Each rank runs the method's inference path on its share of the split, turns maps into
per-threshold correct counts (:class:`~wsol_core.metrics.MaxBoxAccumulator`), and the small
count tensor is all-reduced; classification accuracy likewise. Rank 0 alone draws the pictures
of the first few images it scored.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from matplotlib.figure import Figure

from wsol_core.config import EvalConfig
from wsol_core.data.batch import Batch
from wsol_core.methods import WSOLMethod
from wsol_core.metrics import BoxAccuracy, MaxBoxAccumulator, PxAPAccumulator, PxAPResult, prepare_maps, rescale_boxes
from wsol_core.metrics.accumulators import LOC_IOU
from wsol_core.viz import cam_overlay_grid, component_boxes, denormalize, pr_curve, threshold_curves


@dataclass
class EvalOutcome:
    """What :func:`evaluate_split` measured.

    ``accuracy`` is the V2 (multi-contour) box accuracy, ``accuracy_v1`` the largest-contour one
    from which GT-known / Top-k Loc are read (``None`` on a split without boxes); ``pxap`` the PxAP
    result on a split with masks. ``loc_threshold_index`` is the threshold index Loc was read at:
    pass val's to the test split.
    """

    metrics: dict[str, float]
    accuracy: BoxAccuracy | None
    accuracy_v1: BoxAccuracy | None = None
    pxap: PxAPResult | None = None
    loc_threshold_index: int | None = None
    overlay: Figure | None = None
    curves: Figure | None = None
    pr_curve: Figure | None = None
    extra: dict = field(default_factory=dict)


def eval_autocast(precision: str, device: torch.device):
    """fp32 (the protocol) unless ``eval.precision`` asks for bf16."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


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
        coverage = box_coverage(gt, batch.orig_sizes[keep], (first.shape[-2], first.shape[-1]), first.device)
        for name, mask in masks.items():
            m = mask.detach().float()[keep]
            cov = (
                coverage
                if m.shape[-2:] == coverage.shape[-2:]
                else box_coverage(gt, batch.orig_sizes[keep], (m.shape[-2], m.shape[-1]), m.device)
            )
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

    Logged names (``<split>/`` prefixed), chosen so that no two metrics can be confused:

    * ``maxboxacc_v2`` and its components ``boxacc_v2_iou30`` / ``_iou50`` / ``_iou70`` (every
      contour, the threshold chosen per IoU);
    * ``maxboxacc_v1``: the protocol's original MaxBoxAcc, the largest contour at IoU 0.5;
    * ``gt_known_loc``, ``top1_loc``, ``top5_loc`` (labelled methods) or ``corloc`` (label-free):
      the published definitions, one box per image (the largest contour), IoU >= 0.5 with the GT
      class's map (Top-k also need the class among the top k), read at ``loc_threshold``: the
      threshold index passed as ``loc_threshold_index`` (val's choice, when scoring test), else
      this split's best ``maxboxacc_v1`` threshold (how val chooses it);
    * ``pxap`` where the split carries masks (OpenImages), with the PR curve as a picture.

    A split with masks and no boxes gets PxAP only. Also, on the first ``cfg.mask_stat_images``
    images of each rank, the method's training forward (at ``progress``, in eval mode) gives its
    loss masks, logged as ``mask_<name>_area`` / ``_in_box``; with ``cfg.compare_inference_maps``
    every alternative inference map is scored too (``maxboxacc_v2_map_<name>``). The caller
    decides the precision (:func:`eval_autocast`, ``cfg.precision``).
    """
    was_training = method.training
    method.eval()
    device = next(method.parameters()).device
    thresholds = np.arange(0, 1, cfg.cam_curve_interval)
    accumulator = MaxBoxAccumulator(thresholds, cfg.iou_thresholds, device=device)
    # v1 and the Loc figures: one box per image (the largest contour), IoU 0.5.
    accumulator_v1 = MaxBoxAccumulator(thresholds, (LOC_IOU,), largest_contour=True, device=device)
    pxap = PxAPAccumulator(thresholds, device=device)
    counts = torch.zeros(
        7, dtype=torch.float64, device=device
    )  # top-1 hits, top-5 hits, images, boxed, masked, labelled, skipped
    skipped_before = loader.skipped.total if hasattr(loader, "skipped") else 0
    vis: dict[str, list] = {"images": [], "maps": [], "gt": [], "titles": []}
    mask_stats = MaskStatistics()
    variants: dict[str, MaxBoxAccumulator] = {}
    mask_images = 0
    for loaded in loader:
        batch: Batch = loaded.to(device)
        real = (
            ~batch.is_padding
            if batch.is_padding is not None
            else torch.ones(len(batch), dtype=torch.bool, device=device)
        )
        labels = batch.labels if method.uses_labels else None
        result = method.inference(batch.images, labels)
        keep = real.nonzero().squeeze(1)
        maps = result.maps.float()[keep]
        gt = [b for b, r in zip(batch.gt_boxes_list(), real.tolist()) if r]
        boxed = bool(gt) and all(len(b) > 0 for b in gt)
        sizes = batch.orig_sizes[keep]
        logits = result.logits
        labeled = bool((batch.labels[keep] >= 0).all()) and logits is not None
        scores = logits.float()[keep] if labeled and logits is not None else None
        top = dict(class_scores=scores, labels=batch.labels[keep]) if labeled else {}
        if boxed:
            prepared, scaled = prepare_maps(maps), rescale_boxes(gt, sizes)
            accumulator.update(prepared, scaled, **top)
            accumulator_v1.update(prepared, scaled, **top)
            if cfg.compare_inference_maps:
                for name, variant_maps in method.inference_variants(batch.images, labels).items():
                    if name not in variants:
                        variants[name] = MaxBoxAccumulator(thresholds, cfg.iou_thresholds, device=device)
                    variants[name].update(prepare_maps(variant_maps.float()[keep]), scaled)
            if mask_images < cfg.mask_stat_images and type(method).loss_masks is not WSOLMethod.loss_masks:
                mask_stats.update(method.loss_masks(method(batch.images, batch.labels, progress)), batch, keep)
                mask_images += len(keep)
        if batch.masks is not None:
            pxap.update_raw(maps, batch.masks[keep])
        if scores is not None:  # labeled
            top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
            hits = top5 == batch.labels[keep, None]
            counts[:2] += torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).double()
            counts[5] += len(keep)
        counts[2] += len(keep)
        counts[3] += len(keep) if boxed else 0
        counts[4] += len(keep) if batch.masks is not None else 0
        if draw and len(vis["images"]) < cfg.num_vis_images:
            take = keep[: cfg.num_vis_images - len(vis["images"])]
            vis["images"].extend(denormalize(batch.images[take]))
            vis["maps"].extend(prepare_maps(result.maps.float()[take]).cpu().numpy())
            vis["gt"].extend(
                rescale_boxes([batch.gt_boxes_list()[i] for i in take.tolist()], batch.orig_sizes[take])
                if boxed
                else [np.zeros((0, 4), np.int64)] * len(take)
            )
            vis["titles"].extend(batch.keys[i] for i in take.tolist())

    counts[6] = (loader.skipped.total if hasattr(loader, "skipped") else 0) - skipped_before
    _all_reduce(counts)
    top1, top5, images, boxed_images, masked_images, labelled, skipped = counts.tolist()
    if boxed_images not in (0, images):
        raise ValueError(
            f"{split}: {int(images - boxed_images)} of {int(images)} images have no GT box; a split is scored with boxes or with masks, not a mix"
        )
    metrics: dict[str, float] = {f"{split}/skipped_samples": skipped}  # bad samples left out (data.skip_corrupt)
    accuracy = accuracy_v1 = pxap_result = None
    if boxed_images:
        accumulator.load_state_tensor(_all_reduce(accumulator.state_tensor()))
        accumulator_v1.load_state_tensor(_all_reduce(accumulator_v1.state_tensor()))
        accuracy = accumulator.compute()
        accuracy_v1 = accumulator_v1.compute(loc_threshold_index)
        if loc_threshold_index is None:
            loc_threshold_index = accuracy_v1.best_threshold_index[LOC_IOU]
        metrics.update(accuracy.as_dict(prefix=f"{split}/", loc=False))
        metrics.update(accuracy_v1.as_dict(prefix=f"{split}/"))
        if not method.uses_labels and accuracy_v1.gt_known_loc is not None:
            metrics[f"{split}/corloc"] = accuracy_v1.gt_known_loc
        metrics.update(mask_stats.metrics(f"{split}/"))
        for name in sorted(variants):
            variants[name].load_state_tensor(_all_reduce(variants[name].state_tensor()))
            metrics[f"{split}/maxboxacc_v2_map_{name}"] = variants[name].compute().max_box_acc_v2
    if masked_images:
        pxap.load_state_tensor(_all_reduce(pxap.state_tensor()))
        pxap_result = pxap.compute()
        metrics[f"{split}/pxap"] = pxap_result.pxap
    if labelled and labelled == images:
        metrics[f"{split}/top1_acc"] = 100.0 * top1 / images
        metrics[f"{split}/top5_acc"] = 100.0 * top5 / images

    outcome = EvalOutcome(
        metrics=metrics,
        accuracy=accuracy,
        accuracy_v1=accuracy_v1,
        pxap=pxap_result,
        loc_threshold_index=loc_threshold_index,
    )
    if draw and accuracy is not None:
        outcome.curves = threshold_curves(accuracy.thresholds, accuracy.curves, accuracy.best_threshold)
    if draw and pxap_result is not None:
        outcome.pr_curve = pr_curve(pxap_result)
    if draw and vis["images"]:
        # Predicted boxes at the Loc threshold; a masks-only split has no box threshold: maps only.
        threshold = accuracy_v1.loc_threshold if accuracy_v1 is not None else None
        predicted = [
            component_boxes(m, threshold) if threshold is not None else np.zeros((0, 4), np.int64) for m in vis["maps"]
        ]
        outcome.overlay = cam_overlay_grid(
            np.stack(vis["images"]), np.stack(vis["maps"]), [np.asarray(g) for g in vis["gt"]], predicted, vis["titles"]
        )
    method.train(was_training)
    return outcome
