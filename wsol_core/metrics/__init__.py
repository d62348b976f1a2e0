"""Localization metrics of the WSOL evaluation protocol (Choe et al., CVPR 2020).

* :mod:`~wsol_core.metrics.preparation`: map resize / normalization / quantization, GT box rescaling.
* :mod:`~wsol_core.metrics.boxes`: the all-thresholds box extractor (one pass per map, numba).
* :mod:`~wsol_core.metrics.accumulators`: MaxBoxAcc, MaxBoxAccV2, v1, GT-known / Top-1 / Top-5 Loc,
  CorLoc, as all-reducible count tensors.
* :mod:`~wsol_core.metrics.pxap`: PxAP from pooled score histograms.
* :mod:`~wsol_core.metrics.reference`: the slow per-threshold OpenCV reference (tests, benchmarks).

Typical use::

    from wsol_core.metrics import MaxBoxAccumulator, default_thresholds

    acc = MaxBoxAccumulator(default_thresholds(), device="cuda")
    for batch in loader:
        acc.update_raw(model.localization_maps(batch.images, batch.labels),
                       batch.gt_boxes_list(), batch.orig_sizes,
                       class_scores=logits, labels=batch.labels)
    state = acc.state_tensor(); torch.distributed.all_reduce(state); acc.load_state_tensor(state)
    result = acc.compute()   # result.max_box_acc_v2, result.top1_loc, result.curves, ...
"""

from wsol_core.metrics.accumulators import BoxAccuracy, MaxBoxAccumulator, default_thresholds
from wsol_core.metrics.boxes import best_iou_per_level, best_iou_per_threshold, cut_level_table
from wsol_core.metrics.preparation import (
    EVAL_SIZE,
    normalize_maps,
    prepare_float_maps,
    prepare_maps,
    quantize_maps,
    rescale_boxes,
    resize_maps,
)
from wsol_core.metrics.pxap import PxAPAccumulator, PxAPResult, pxap

__all__ = [
    "EVAL_SIZE",
    "BoxAccuracy",
    "MaxBoxAccumulator",
    "PxAPAccumulator",
    "PxAPResult",
    "best_iou_per_level",
    "best_iou_per_threshold",
    "cut_level_table",
    "default_thresholds",
    "normalize_maps",
    "prepare_float_maps",
    "prepare_maps",
    "pxap",
    "quantize_maps",
    "rescale_boxes",
    "resize_maps",
]
