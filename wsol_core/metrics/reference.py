"""The project's slow reference evaluator: the protocol, one threshold at a time, with OpenCV.

Written from the protocol of Choe et al., "Evaluating Weakly Supervised Object Localization Methods
Right" (CVPR 2020), as the field's evaluator applies it: for each threshold, binarize the uint8 map
with ``cv2.threshold``, run ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)``, take every
contour's ``cv2.boundingRect`` and score the best IoU against the GT boxes. It is the yardstick the
fast path (:mod:`wsol_core.metrics.boxes`) is tested and benchmarked against, and it is as slow as
the field's code: one contour search per threshold.

OpenCV is a test and benchmark dependency only; it is imported inside the functions so that
``wsol_core.metrics`` imports without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "reference_best_iou",
    "reference_boxes",
    "reference_iou",
    "reference_normalize",
    "reference_prepare",
    "reference_pxap",
    "reference_rescale_boxes",
]


def reference_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU ``[len(a), len(b)]`` of ``x0, y0, x1, y1`` boxes with inclusive corners.

    Integer areas (width and height get +1) and one float64 division per pair.
    """
    a = np.asarray(boxes_a, np.int64)[:, None, :]
    b = np.asarray(boxes_b, np.int64)[None, :, :]
    inter_w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    inter_h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    inter = np.where((inter_w > 0) & (inter_h > 0), inter_w * inter_h, 0)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def reference_boxes(score_map: np.ndarray, threshold: float, *, largest_contour: bool = False) -> np.ndarray:
    """The protocol's boxes for one uint8 map at one threshold: ``int64 [k, 4]``, ``k >= 1``.

    Foreground is ``map > int(threshold * max(map))``; each contour (holes included) gives
    ``(x, y, min(x + w, W - 1), min(y + h, H - 1))``; no contour gives ``(0, 0, 0, 0)``. With
    ``largest_contour`` only the contour with the largest ``cv2.contourArea`` is kept (v1).
    """
    import cv2

    height, width = score_map.shape
    cut = int(threshold * np.max(score_map))
    _, binary = cv2.threshold(score_map, cut, 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return np.zeros((1, 4), np.int64)
    if largest_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = np.empty((len(contours), 4), np.int64)
    for k, contour in enumerate(contours):
        x, y, w, h = cv2.boundingRect(contour)
        boxes[k] = (x, y, min(x + w, width - 1), min(y + h, height - 1))
    return boxes


def reference_best_iou(
    maps: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    thresholds: np.ndarray,
    *,
    largest_contour: bool = False,
    return_num_boxes: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Best IoU per image and threshold, ``float64 [N, T]``, one contour search per threshold.

    ``maps`` is ``uint8 [N, H, W]``; ``gt_boxes[i]`` is ``[k_i, 4]`` in map coordinates. With
    ``return_num_boxes`` also the number of boxes per threshold (``int32 [N, T]``).
    """
    maps = np.asarray(maps)
    thresholds = np.asarray(thresholds, np.float64)
    best = np.empty((len(maps), len(thresholds)), np.float64)
    counts = np.empty((len(maps), len(thresholds)), np.int32)
    for i, score_map in enumerate(maps):
        gt = np.asarray(gt_boxes[i], np.int64).reshape(-1, 4)
        per_threshold = [
            reference_boxes(score_map, threshold, largest_contour=largest_contour) for threshold in thresholds
        ]
        counts[i] = [len(boxes) for boxes in per_threshold]
        # Like the field's evaluator: one IoU computation over all boxes of all thresholds, then
        # the best box of each threshold's segment.
        box_best = reference_iou(np.concatenate(per_threshold), gt).max(axis=1)
        segment_starts = np.concatenate([[0], np.cumsum(counts[i])[:-1]])
        best[i] = np.maximum.reduceat(box_best, segment_starts)
    return (best, counts) if return_num_boxes else best


def reference_normalize(score_map: np.ndarray) -> np.ndarray:
    """Min-max normalization in the map's own dtype; a constant or NaN map becomes zeros."""
    score_map = np.array(score_map)
    if np.isnan(score_map).any() or score_map.min() == score_map.max():
        return np.zeros_like(score_map)
    score_map -= score_map.min()
    score_map /= score_map.max()
    return score_map


def reference_prepare(score_map: np.ndarray, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's map preparation with OpenCV: ``(normalized float map, uint8 map)``.

    ``cv2.resize(INTER_CUBIC)`` to ``size x size``, min-max normalization, ``uint8(map * 255)``.
    """
    import cv2

    resized = cv2.resize(np.asarray(score_map), (size, size), interpolation=cv2.INTER_CUBIC)
    normalized = reference_normalize(resized)
    return normalized, (normalized * 255).astype(np.uint8)


def reference_rescale_boxes(boxes: np.ndarray, width: int, height: int, size: int = 224) -> np.ndarray:
    """GT boxes from original image coordinates to ``size x size``: ``x * size / width``, truncated."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        out.append(
            (
                int(x0 * size / width),
                int(y0 * size / height),
                int(x1 * size / width),
                int(y1 * size / height),
            )
        )
    return np.asarray(out, np.int64).reshape(-1, 4)


def reference_pxap(score_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], thresholds: np.ndarray) -> float:
    """PxAP (%) of float score maps in ``[0, 1]`` against masks (0, 1, 255 = ignore).

    Per image, histograms of the foreground and background pixels' scores over the bins
    ``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` are summed; the PR curve is read from
    reversed cumulative sums and precision is integrated over recall steps.
    """
    edges = np.append(np.asarray(thresholds, np.float64), [1.0, 2.0, 3.0])
    fg_hist = np.zeros(len(edges) - 1, np.float64)
    bg_hist = np.zeros(len(edges) - 1, np.float64)
    for score_map, mask in zip(score_maps, masks, strict=True):
        fg_hist += np.histogram(score_map[mask == 1], bins=edges)[0]
        bg_hist += np.histogram(score_map[mask == 0], bins=edges)[0]
    tp = np.cumsum(fg_hist[::-1])
    fp = np.cumsum(bg_hist[::-1])
    fn = fg_hist.sum() - tp
    predicted = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / predicted
        recall = tp / (tp + fn)
    steps = np.diff(recall)
    keep = predicted[1:] != 0
    return float((precision[1:] * steps)[keep].sum() * 100)
