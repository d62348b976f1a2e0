"""Input checks shared by the metrics; every error names the offending image index.

Bad evaluation input must fail loudly (DESIGN.md, "Reliability"): a silently clipped box or a
map full of ``inf`` would change published numbers without a trace.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_MAP_SIDE = 4096
"""Largest supported map side (the protocol's maps are 224 x 224; the extractor packs coordinates)."""

__all__ = [
    "MAX_MAP_SIDE",
    "as_uint8_maps",
    "check_finite_maps",
    "check_float_maps",
    "check_masks",
    "check_thresholds",
    "flatten_gt_boxes",
    "to_numpy",
]


def to_numpy(array: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """A host numpy view (or copy) of a numpy array, torch tensor on any device, or sequence."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _first_index(mask: torch.Tensor | np.ndarray) -> int:
    return int(np.flatnonzero(to_numpy(mask))[0])


def as_uint8_maps(maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """Check quantized score maps and return them as a C-contiguous host ``uint8 [N, H, W]`` array."""
    dtype = maps.dtype
    if dtype not in (np.uint8, torch.uint8):
        raise ValueError(
            f"maps must be uint8 [N, H, W] (the protocol's uint8(map * 255)), got dtype {dtype}; "
            "use prepare_maps() or quantize_maps() on float maps"
        )
    if maps.ndim != 3 or maps.shape[1] < 1 or maps.shape[2] < 1:
        raise ValueError(f"maps must be uint8 [N, H, W], got shape {tuple(maps.shape)}")
    if max(maps.shape[1:]) > MAX_MAP_SIDE:
        raise ValueError(f"maps larger than {MAX_MAP_SIDE} pixels a side are not supported")
    return np.ascontiguousarray(to_numpy(maps))


def check_thresholds(thresholds: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    """Thresholds as float64: 1-D, non-empty, strictly increasing, within ``[0, 1]``."""
    thr = np.asarray(to_numpy(thresholds), dtype=np.float64)
    if thr.ndim != 1 or thr.size == 0:
        raise ValueError(f"thresholds must be a non-empty 1-D array, got shape {thr.shape}")
    if not np.all(np.isfinite(thr)) or thr[0] < 0 or thr[-1] > 1:
        raise ValueError("thresholds must lie in [0, 1], e.g. np.arange(0, 1, 0.001)")
    if np.any(np.diff(thr) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    return thr


def check_finite_maps(maps: torch.Tensor, name: str = "maps") -> None:
    """Float maps must be ``[N, H, W]`` and free of ``inf`` (NaN is allowed: the map becomes zeros)."""
    if not torch.is_floating_point(maps):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {maps.dtype}")
    if maps.ndim != 3 or maps.shape[1] < 1 or maps.shape[2] < 1:
        raise ValueError(f"{name} must be [N, H, W], got shape {tuple(maps.shape)}")
    bad = torch.isinf(maps).flatten(1).any(1)
    if bool(bad.any()):
        raise ValueError(f"{name}[{_first_index(bad)}] contains inf; score maps must be finite")


def check_float_maps(maps: torch.Tensor, name: str = "maps") -> torch.Tensor:
    """Already-normalized float maps: finite and within ``[0, 1]``; NaN maps become zeros.

    Returns the maps with every map containing a NaN replaced by zeros, as the protocol's
    ``normalize_scoremap`` does.
    """
    check_finite_maps(maps, name)
    flat = maps.flatten(1)
    has_nan = torch.isnan(flat).any(1)
    lo = torch.where(torch.isnan(flat), 1.0, flat).amin(1)
    hi = torch.where(torch.isnan(flat), 0.0, flat).amax(1)
    bad = ((lo < 0) | (hi > 1)) & ~has_nan
    if bool(bad.any()):
        i = _first_index(bad)
        raise ValueError(
            f"{name}[{i}] has values in [{float(lo[i])}, {float(hi[i])}], outside [0, 1]; "
            "normalize it first (prepare_maps / normalize_maps)"
        )
    if bool(has_nan.any()):
        maps = torch.where(has_nan[:, None, None], torch.zeros_like(maps), maps)
    return maps


def check_masks(masks: torch.Tensor, shape: tuple[int, ...]) -> None:
    """PxAP masks: ``uint8`` of the maps' shape with values 0 (background), 1 (object), 255 (ignore)."""
    if masks.dtype != torch.uint8:
        raise ValueError(f"masks must be uint8 (0, 1, 255 = ignore), got dtype {masks.dtype}")
    if tuple(masks.shape) != tuple(shape):
        raise ValueError(f"masks shape {tuple(masks.shape)} differs from the maps' {tuple(shape)}")
    bad = ((masks != 0) & (masks != 1) & (masks != 255)).flatten(1).any(1)
    if bool(bad.any()):
        i = _first_index(bad)
        values = torch.unique(masks[i]).tolist()
        raise ValueError(f"masks[{i}] has values {values}; only 0, 1 and 255 (ignore) are allowed")


def flatten_gt_boxes(
    gt_boxes: Sequence[np.ndarray | torch.Tensor], n: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check per-image GT boxes and pack them as ``int64 [M, 4]`` plus offsets ``int64 [n + 1]``.

    Each image needs at least one box ``x0, y0, x1, y1`` with integer values, inclusive corners,
    ``0 <= x0 <= x1 <= width`` and ``0 <= y0 <= y1 <= height``.

    A far corner may equal the map side: a GT box that reaches the image's right or bottom edge
    (``x1 == image width``, as many annotations are written) rescales to exactly ``width``, and
    the protocol scores it as it is (IoU by arithmetic, no pixel lookup). One past that is a box
    that really leaves the image, and raises.
    """
    if len(gt_boxes) != n:
        raise ValueError(f"got {len(gt_boxes)} GT box arrays for {n} maps")
    arrays = [to_numpy(boxes) for boxes in gt_boxes]
    offsets = np.zeros(n + 1, np.int64)
    for i, b in enumerate(arrays):
        if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] < 1:
            raise ValueError(f"gt_boxes[{i}] must be [k >= 1, 4] (x0, y0, x1, y1), got shape {b.shape}")
        offsets[i + 1] = offsets[i] + len(b)
    if n == 0:
        return np.zeros((0, 4), np.int64), offsets
    packed = np.concatenate(arrays)
    # The checks below run once on all boxes; a failing box is mapped back to its image.
    image_of = np.repeat(np.arange(n), np.diff(offsets))

    def fail(bad: np.ndarray, message: str) -> None:
        k = int(np.flatnonzero(bad)[0])
        i = int(image_of[k])
        j = k - int(offsets[i])
        raise ValueError(f"gt_boxes[{i}] box {j} {packed[k].tolist()} {message}")

    if not np.issubdtype(packed.dtype, np.integer):
        if not np.issubdtype(packed.dtype, np.floating):
            raise ValueError(f"gt_boxes must hold integer coordinates, got dtype {packed.dtype}")
        fractional = np.any(packed != np.round(packed), axis=1)
        if fractional.any():
            fail(
                fractional,
                "has non-integer coordinates; use rescale_boxes() for boxes in original image coordinates",
            )
    packed = np.ascontiguousarray(packed, dtype=np.int64)
    inverted = (packed[:, 2] < packed[:, 0]) | (packed[:, 3] < packed[:, 1])
    if inverted.any():
        fail(inverted, "is inverted (x1 < x0 or y1 < y0)")
    outside = (packed[:, 0] < 0) | (packed[:, 1] < 0) | (packed[:, 2] > width) | (packed[:, 3] > height)
    if outside.any():
        fail(
            outside,
            f"leaves the {width}x{height} map (corners must lie in [0, {width}] x [0, {height}]; "
            "the far edge itself is allowed, as in the protocol)",
        )
    return packed, offsets
