"""PxAP: area under the pixel precision-recall curve, for datasets with masks.

Protocol (Choe et al., CVPR 2020): every pixel with mask value 1 is a positive, 0 a
negative, 255 ignored. For each score-map threshold the pixels scoring at or above it are predicted
foreground; precision and recall are pooled over all pixels of all images, and PxAP is the area
under the PR curve in percent.

The pooled counts are histograms: with thresholds ``t_0 < ... < t_{T-1}`` the bins are
``[t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]`` (``T + 2`` bins, the protocol's
``np.histogram`` edges ``thresholds + [1, 2, 3]``). Summed histograms give TP and FP at every
threshold by reversed cumulative sums; precision is integrated over recall steps. The state is two
``int64 [T + 2]`` histograms (one tensor ``[2, T + 2]``) that DDP ranks all-reduce.

Scores are the *normalized float* maps (before uint8 quantization), as in the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch

from wsol_core.metrics.preparation import prepare_float_maps
from wsol_core.metrics.validation import check_float_maps, check_masks, check_thresholds

__all__ = ["PxAPAccumulator", "PxAPResult", "pxap"]


@numba.njit(parallel=True, cache=True, nogil=True)
def _pixel_histograms(scores, masks, edges, step, out):  # pragma: no cover - compiled
    """Per image, the foreground (row 0) and background (row 1) histograms of its pixel scores.

    The bin of ``s`` is np.histogram's: the last edge ``<= s``, the top bin closed. On an evenly
    spaced grid (``step > 0``) it starts at ``floor(s / step)`` and moves at most a place to settle
    the rounding; otherwise a binary search."""
    last = edges.shape[0] - 2
    n, h, w = scores.shape
    for i in numba.prange(n):
        for y in range(h):
            for x in range(w):
                label = masks[i, y, x]
                if label > 1:
                    continue
                v = np.float64(scores[i, y, x])
                if step > 0:
                    b = min(max(int(v / step), 0), last)
                    while b > 0 and v < edges[b]:
                        b -= 1
                    while b < last and v >= edges[b + 1]:
                        b += 1
                else:
                    b = min(max(np.searchsorted(edges, v, side="right") - 1, 0), last)
                out[i, 1 - label, b] += 1


@dataclass(frozen=True)
class PxAPResult:
    """PxAP (percent) and the PR curve it integrates.

    ``precision`` and ``recall`` have ``T + 2`` entries from the highest bin down (the last entry
    is threshold ``t_0``); ``precision`` is NaN where nothing is predicted.
    """

    pxap: float
    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray


class PxAPAccumulator:
    """Pooled foreground / background score histograms over batches.

    Args:
        thresholds: 1-D increasing in ``[0, 1)``, e.g. ``np.arange(0, 1, 0.001)``.
        device: where the histogram state lives (``cuda`` for NCCL all-reduce).
    """

    def __init__(
        self,
        thresholds: np.ndarray | torch.Tensor | Sequence[float],
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.thresholds = check_thresholds(thresholds)
        if self.thresholds[-1] >= 1:
            raise ValueError("PxAP thresholds must be below 1 (bins [1, 2) and [2, 3] are added)")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._edges = torch.as_tensor(
            np.append(self.thresholds, [1.0, 2.0, 3.0]), dtype=torch.float64, device=self.device
        )
        self._state = torch.zeros((2, len(self.thresholds) + 2), dtype=torch.int64, device=self.device)
        # The protocol's grid np.arange(0, 1, step) is evenly spaced: the bin is then floor(s / step)
        # up to one place of rounding, which one comparison each way settles (2x faster than a
        # binary search over 1,000 edges).
        steps = np.diff(self.thresholds)
        self._step = (
            float(steps[0])
            if len(steps) and self.thresholds[0] == 0 and np.allclose(steps, steps[0], rtol=0, atol=1e-12)
            else None
        )

    @property
    def num_bins(self) -> int:
        return len(self.thresholds) + 2

    def reset(self) -> None:
        self._state.zero_()

    def state_tensor(self) -> torch.Tensor:
        """A copy of the histograms ``int64 [2, T + 2]`` (row 0 foreground, row 1 background)."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        if tuple(state.shape) != tuple(self._state.shape):
            raise ValueError(f"state tensor shape {tuple(state.shape)} does not match {tuple(self._state.shape)}")
        self._state.copy_(state.to(self.device, torch.int64))

    def merge(self, other: PxAPAccumulator) -> PxAPAccumulator:
        if not np.array_equal(other.thresholds, self.thresholds):
            raise ValueError("cannot merge PxAP accumulators with different thresholds")
        self._state += other._state.to(self.device)
        return self

    def update(self, scores: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> None:
        """Count normalized float score maps ``[N, H, W]`` in ``[0, 1]`` against ``uint8`` masks.

        A map containing NaN counts as zeros (the protocol's rule); ``inf``, values outside
        ``[0, 1]`` or mask values other than 0, 1, 255 raise ``ValueError`` naming the index.
        """
        scores = check_float_maps(torch.as_tensor(scores), "scores")
        masks = torch.as_tensor(masks)
        check_masks(masks, tuple(scores.shape))
        if scores.device.type == "cpu" or self.device.type == "cpu":
            # One pass per pixel, parallel over images, in numba (torch's per-op temporaries were
            # slower than the protocol's np.histogram on CPU).
            if scores.dtype not in (torch.float32, torch.float64):
                scores = scores.float()
            per_image = np.zeros((len(scores), 2, self.num_bins), np.int64)
            _pixel_histograms(
                scores.cpu().contiguous().numpy(),
                masks.cpu().contiguous().numpy(),
                self._edges.cpu().numpy(),
                self._step or 0.0,
                per_image,
            )
            self._state += torch.from_numpy(per_image.sum(0)).to(self.device)
            return
        scores, masks = scores.to(self.device, torch.float64), masks.to(self.device)
        bins = self._bins(scores)
        for row, label in enumerate((1, 0)):
            selected = bins[masks == label]
            self._state[row] += torch.bincount(selected, minlength=self.num_bins)[: self.num_bins]

    def _bins(self, scores: torch.Tensor) -> torch.Tensor:
        """np.histogram's bin of each score: the last edge <= score (the top bin is closed)."""
        if self._step is None:
            return torch.bucketize(scores, self._edges, right=True) - 1
        last = self.num_bins - 1
        bins = torch.floor(scores / self._step).to(torch.int64).clamp_(0, last)
        bins -= (scores < self._edges[bins]).to(torch.int64)
        bins += (scores >= self._edges[(bins + 1).clamp_(max=last + 1)]).to(torch.int64) * (bins < last)
        return bins.clamp_(0, last)

    def update_raw(self, maps: torch.Tensor | np.ndarray, masks: torch.Tensor | np.ndarray) -> None:
        """Count raw float maps of any size: resized to the masks' size and normalized first."""
        masks = torch.as_tensor(masks)
        if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
            raise ValueError(f"masks must be square [N, S, S], got shape {tuple(masks.shape)}")
        self.update(prepare_float_maps(maps, masks.shape[1]), masks)

    def compute(self) -> PxAPResult:
        """PxAP from the pooled histograms.

        Raises:
            ValueError: no foreground pixel, or no pixel at all, was counted.
        """
        fg_hist, bg_hist = self._state.cpu().numpy().astype(np.float64)
        if fg_hist.sum() == 0:
            raise ValueError("PxAP needs at least one foreground (mask == 1) pixel")
        tp = np.cumsum(fg_hist[::-1])
        fp = np.cumsum(bg_hist[::-1])
        fn = fg_hist.sum() - tp
        predicted = tp + fp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / predicted
            recall = tp / (tp + fn)
        keep = predicted[1:] != 0
        area = float((precision[1:] * np.diff(recall))[keep].sum() * 100)
        return PxAPResult(pxap=area, precision=precision, recall=recall, thresholds=self.thresholds.copy())


def pxap(
    scores: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    thresholds: np.ndarray | torch.Tensor | Sequence[float],
) -> float:
    """PxAP (percent) of normalized float maps ``[N, H, W]`` against masks (0, 1, 255 = ignore)."""
    acc = PxAPAccumulator(thresholds)
    acc.update(scores, masks)
    return acc.compute().pxap
