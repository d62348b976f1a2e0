"""Score-map and GT-box preparation, batched in torch (CPU or CUDA).

The protocol (Choe et al., CVPR 2020) prepares each localization map before thresholding:

1. resize to 224 x 224 with bicubic interpolation (``cv2.resize(..., INTER_CUBIC)`` in the field's
   evaluator);
2. min-max normalize to ``[0, 1]``; a constant map, or one containing a NaN, becomes all zeros;
3. quantize as ``uint8(map * 255)`` (truncation).

GT boxes, given in original image pixels (inclusive corners), are rescaled to 224 x 224 as
``int(x * 224 / width)`` per coordinate.

Bicubic resize: torch vs OpenCV
-------------------------------
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` and ``cv2.resize`` with
``INTER_CUBIC`` compute the same function: Keys' cubic convolution with ``a = -0.75``, half-pixel
centres (source ``x = (dst + 0.5) * in / out - 0.5``), border pixels replicated, no antialiasing
when shrinking. They differ only in float32 rounding (order of the separable passes' sums and how
the weights are computed), about 1e-7 relative. After min-max normalization a rounding difference
can move a value across an integer of ``map * 255``, so a small fraction of uint8 pixels differ by
exactly one; ``tests/test_metrics.py`` measures that fraction on CAM-like maps and bounds it (and
the max difference, 1). Everything after the resize (normalization, quantization, thresholds,
boxes) is bit-exact with the protocol; maps that are already 224 x 224 are not resampled at all.

One deliberate deviation: a map that is constant (but not zero) before resizing comes out of either
library's bicubic resize with float32 rounding noise (the weights do not sum to exactly 1), and the
field's code then min-max normalizes that noise into a meaningless 0..255 map. Here such a map is
treated as the constant map it is and becomes zeros, as the protocol intends for constant maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsol_core.metrics.validation import check_finite_maps, check_float_maps

__all__ = [
    "EVAL_SIZE",
    "normalize_maps",
    "prepare_float_maps",
    "prepare_maps",
    "quantize_maps",
    "rescale_boxes",
    "resize_maps",
]

EVAL_SIZE = 224
"""Side of the square evaluation resolution fixed by the protocol."""


def _as_float_maps(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    maps = torch.as_tensor(maps)
    if not torch.is_floating_point(maps):
        raise ValueError(f"maps must be floating point [N, h, w], got dtype {maps.dtype}")
    if maps.dtype not in (torch.float32, torch.float64):
        # Half-precision maps (AMP) are resized in float32, like the field's numpy code would.
        maps = maps.float()
    return maps


def _resize(maps: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized maps and, per map, whether the *input* was constant (or had a NaN)."""
    if maps.shape[1:] == (size, size):
        return maps, torch.zeros(len(maps), dtype=torch.bool, device=maps.device)
    flat = maps.flatten(1)
    # amin/amax propagate NaN, so `hi > lo` is False for a NaN map as well as for a constant one.
    degenerate = ~(flat.amax(1) > flat.amin(1))
    resized = F.interpolate(maps[:, None], size=(size, size), mode="bicubic", align_corners=False)
    return resized[:, 0], degenerate


def _normalize(maps: torch.Tensor, degenerate: torch.Tensor | None = None) -> torch.Tensor:
    flat = maps.flatten(1)
    lo = flat.amin(1)
    hi = flat.amax(1)
    # amin/amax propagate NaN, so `hi > lo` is False for a NaN map as well as for a constant one.
    valid = hi > lo
    if degenerate is not None:
        valid &= ~degenerate
    scale = torch.where(valid, hi - lo, torch.ones_like(hi))
    # One new tensor, then in place: these maps are large (N x 224 x 224) and memory-bound.
    normalized = maps - lo[:, None, None]
    normalized.div_(scale[:, None, None])
    return normalized.masked_fill_(~valid[:, None, None], 0.0)


def _quantize(maps: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    # Values are in [0, 1], so the float -> uint8 conversion truncates exactly like numpy's astype.
    return (maps.mul_(255) if in_place else maps * 255).to(torch.uint8)


# Maps per preparation step: keeps each temporary (chunk x 224 x 224 floats) small enough for the
# CPU allocator to reuse instead of mapping fresh pages every time; costs nothing on a GPU.
_CHUNK = 64


def _prepare(maps: torch.Tensor, size: int, quantize: bool) -> torch.Tensor:
    check_finite_maps(maps)
    parts = []
    for part in maps.split(_CHUNK):
        normalized = _normalize(*_resize(part, size))  # a new tensor, never the caller's
        parts.append(_quantize(normalized, in_place=True) if quantize else normalized)
    if not parts:
        return torch.empty((0, size, size), dtype=torch.uint8 if quantize else maps.dtype, device=maps.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def resize_maps(maps: torch.Tensor | np.ndarray, size: int = EVAL_SIZE) -> torch.Tensor:
    """Bicubic resize of ``[N, h, w]`` float maps to ``[N, size, size]`` (see the module notes).

    Maps already at ``size x size`` are returned unchanged (a bicubic resize to the same size is
    the identity).
    """
    maps = _as_float_maps(maps)
    check_finite_maps(maps)
    return _resize(maps, size)[0]


def normalize_maps(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-map min-max normalization to ``[0, 1]`` in the maps' dtype; constant or NaN maps -> 0.

    ``(x - min) / (max - min)``: the same two IEEE operations per pixel as the protocol's
    ``map -= map.min(); map /= map.max()``, so the result is bit-identical to it.
    """
    maps = _as_float_maps(maps)
    check_finite_maps(maps)
    return _normalize(maps)


def quantize_maps(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``uint8(map * 255)`` of normalized float maps in ``[0, 1]``, computed in the maps' dtype.

    A map containing NaN becomes zeros (the protocol's rule); ``inf`` or values outside ``[0, 1]``
    raise ``ValueError`` naming the map's index.
    """
    return _quantize(check_float_maps(_as_float_maps(maps)))


def prepare_maps(maps: torch.Tensor | np.ndarray, size: int = EVAL_SIZE) -> torch.Tensor:
    """Raw localization maps ``[N, h, w]`` -> the protocol's ``uint8 [N, size, size]`` maps.

    Resize (bicubic), min-max normalize (constant or NaN map -> zeros), ``uint8(map * 255)``. Runs
    on the maps' device. A map that is constant *before* resizing also becomes zeros: bicubic
    weights do not sum to exactly 1 in float32, so a resized constant map carries rounding noise
    that normalization would blow up to the full 0..255 range (OpenCV does the same; see the module
    notes).

    Raises:
        ValueError: wrong shape or dtype, or a map containing ``inf`` (the index is named).
    """
    return _prepare(_as_float_maps(maps), size, quantize=True)


def prepare_float_maps(maps: torch.Tensor | np.ndarray, size: int = EVAL_SIZE) -> torch.Tensor:
    """Like :func:`prepare_maps` but stops before quantization: float maps in ``[0, 1]``.

    PxAP uses these: the protocol histograms the normalized float scores, not the uint8 ones.
    """
    return _prepare(_as_float_maps(maps), size, quantize=False)


def rescale_boxes(
    boxes: Sequence[torch.Tensor | np.ndarray],
    orig_sizes: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    size: int = EVAL_SIZE,
) -> list[torch.Tensor]:
    """GT boxes from original image pixels to the ``size x size`` evaluation grid.

    Args:
        boxes: per image, ``[k_i, 4]`` boxes ``x0, y0, x1, y1`` (inclusive corners) in original
            pixels.
        orig_sizes: ``[N, 2]`` original ``(width, height)`` per image.
        size: the evaluation side (224).

    Returns:
        Per image, ``int64 [k_i, 4]`` boxes: ``int(x * size / width)`` and ``int(y * size / height)``
        computed in float64 in that order, as the protocol does.

    Raises:
        ValueError: a count mismatch, a malformed box array, or a non-positive image size (the
            index is named).
    """
    sizes = torch.as_tensor(orig_sizes).detach().to("cpu", torch.float64)
    if sizes.ndim != 2 or sizes.shape[1] != 2 or len(sizes) != len(boxes):
        raise ValueError(
            f"orig_sizes must be [N, 2] (width, height) for {len(boxes)} images, got shape {tuple(sizes.shape)}"
        )
    bad = ~(sizes > 0).all(1)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"orig_sizes[{i}] = {sizes[i].tolist()} is not a positive (width, height)")
    out = []
    for i, image_boxes in enumerate(boxes):
        b = torch.as_tensor(image_boxes)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be [k, 4] (x0, y0, x1, y1), got {tuple(b.shape)}")
        device = b.device
        b = b.detach().to("cpu", torch.float64)
        width, height = sizes[i]
        scale = torch.stack([width, height, width, height])
        # (x * size) / width, truncated toward zero like Python's int().
        out.append(torch.trunc(b * size / scale).to(device=device, dtype=torch.int64))
    return out
