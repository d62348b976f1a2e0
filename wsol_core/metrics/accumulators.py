"""Streaming box-accuracy metrics: MaxBoxAcc, MaxBoxAccV2, GT-known / Top-1 / Top-5 Loc, CorLoc.

Definitions (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
CVPR 2020):

* per image and threshold ``t``, ``IoU(t)`` is the best IoU over all predicted boxes (every contour,
  holes included; only the largest one for v1) and all GT boxes;
* ``BoxAcc(t, delta) = 100 * #{images with IoU(t) >= delta / 100} / #images``;
* ``MaxBoxAcc(delta) = max_t BoxAcc(t, delta)``, the threshold chosen separately per ``delta``;
  MaxBoxAccV2 is the mean over ``delta in {30, 50, 70}``; MaxBoxAcc (v1) is ``delta = 50`` with the
  largest contour only (``largest_contour=True``);
* GT-known Loc is ``BoxAcc(t*, 50)`` at the chosen threshold ``t*`` with the GT class's map; Top-1 /
  Top-5 Loc also need the GT class among the top 1 / top 5 predicted classes; CorLoc is GT-known
  Loc computed with class-agnostic maps. The published figures use one box per image, so the
  training and evaluation jobs read them from the largest-contour (v1) accumulator, at the
  threshold chosen on val (:func:`wsol_core.train.evaluate.evaluate_split`).

Everything the metrics need is a sum over images, so the state is a small count tensor
``int64 [D + 2, T + 1]`` (``D`` IoU thresholds, ``T`` score-map thresholds) that does not grow with
the number of images and that DDP ranks ``all_reduce`` with one call::

    state = acc.state_tensor()                   # on acc.device (cuda for NCCL)
    torch.distributed.all_reduce(state)          # SUM
    acc.load_state_tensor(state)

Layout of the state: row ``d < D`` counts images with ``IoU(t) >= delta_d / 100`` per threshold;
row ``D`` images with ``IoU(t) >= 0.5`` and the label top-1; row ``D + 1`` the same with the label
in the top 5; column ``T`` holds the number of images counted in that row (all images for the delta
rows, images that came with class scores for the two top-k rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsol_core.metrics.boxes import best_iou_per_level, cut_level_table
from wsol_core.metrics.preparation import EVAL_SIZE, prepare_maps, rescale_boxes
from wsol_core.metrics.validation import as_uint8_maps, check_thresholds, flatten_gt_boxes

__all__ = ["BoxAccuracy", "MaxBoxAccumulator", "default_thresholds"]

LOC_IOU = 50
"""IoU threshold (percent) of GT-known, Top-1 and Top-5 Loc and of MaxBoxAcc v1."""


def default_thresholds(interval: float = 0.001) -> np.ndarray:
    """The protocol's score-map thresholds ``np.arange(0, 1, interval)`` (default: 1000 of them)."""
    return np.arange(0, 1, interval)


@dataclass(frozen=True)
class BoxAccuracy:
    """Final box-accuracy figures, all in percent.

    Attributes:
        thresholds: the ``T`` score-map thresholds.
        iou_deltas: the IoU thresholds (percent), e.g. ``(30, 50, 70)``.
        curves: ``delta -> BoxAcc(t, delta)`` for every threshold, ``float64 [T]`` (for plotting).
        max_box_acc: ``delta -> MaxBoxAcc(delta)``.
        best_threshold: ``delta -> `` the first threshold reaching ``MaxBoxAcc(delta)``.
        best_threshold_index: the same as an index into ``thresholds``.
        max_box_acc_v2: mean of ``max_box_acc`` over the deltas (MaxBoxAccV2 for 30/50/70).
        num_images: images counted.
        loc_threshold: the threshold ``t*`` at which GT-known / Top-k Loc are read (``None`` when
            they are not available).
        gt_known_loc, top1_loc, top5_loc: localization accuracies at ``t*``; ``None`` when not
            available (``50`` not among the deltas, or no class scores given).
        largest_contour: whether boxes came from the largest contour only (v1 mode).
    """

    thresholds: np.ndarray
    iou_deltas: tuple[int, ...]
    curves: dict[int, np.ndarray]
    max_box_acc: dict[int, float]
    best_threshold: dict[int, float]
    best_threshold_index: dict[int, int]
    max_box_acc_v2: float
    num_images: int
    loc_threshold: float | None = None
    gt_known_loc: float | None = None
    top1_loc: float | None = None
    top5_loc: float | None = None
    largest_contour: bool = False

    @property
    def corloc(self) -> float | None:
        """CorLoc: GT-known Loc of class-agnostic maps (co-localization); same computation."""
        return self.gt_known_loc

    def as_dict(self, prefix: str = "", *, loc: bool = True) -> dict[str, float]:
        """Flat scalar figures for logging (e.g. MLflow), under names that cannot be confused.

        Multi-contour mode (V2): ``boxacc_v2_iou30`` / ``_iou50`` / ``_iou70`` (MaxBoxAcc at each
        IoU, the threshold chosen per IoU) with their ``_threshold`` and the mean
        ``maxboxacc_v2``. Largest-contour mode (v1): ``maxboxacc_v1`` (IoU 0.5, the protocol's
        original metric) and its ``_threshold``; other IoUs as ``maxboxacc_v1_iou<d>``. With
        ``loc``: ``loc_threshold``, ``gt_known_loc``, ``top1_loc``, ``top5_loc`` where available.
        """
        out: dict[str, float] = {}
        for delta in self.iou_deltas:
            if self.largest_contour:
                name = "maxboxacc_v1" if delta == LOC_IOU else f"maxboxacc_v1_iou{delta}"
            else:
                name = f"boxacc_v2_iou{delta}"
            out[f"{prefix}{name}"] = self.max_box_acc[delta]
            out[f"{prefix}{name}_threshold"] = self.best_threshold[delta]
        if not self.largest_contour:
            out[f"{prefix}maxboxacc_v2"] = self.max_box_acc_v2
        if loc:
            for key in ("loc_threshold", "gt_known_loc", "top1_loc", "top5_loc"):
                value = getattr(self, key)
                if value is not None:
                    out[f"{prefix}{key}"] = value
        return out


class MaxBoxAccumulator:
    """Accumulates per-threshold correct counts over batches; see the module docstring.

    Args:
        thresholds: score-map thresholds, 1-D increasing in ``[0, 1]``; the protocol uses
            ``np.arange(0, 1, 0.001)`` (:func:`default_thresholds`).
        iou_deltas: IoU thresholds in percent (integers in ``1..100``).
        largest_contour: v1 mode, score only the largest contour per threshold.
        device: where the count state lives (``cuda`` for NCCL all-reduce); maps may come from any
            device, the contour extraction itself runs on the CPU.

    Example::

        acc = MaxBoxAccumulator(default_thresholds())
        for batch in loader:
            logits = classifier(batch.images)
            cams = model.localization_maps(batch.images, batch.labels)
            acc.update_raw(cams, batch.gt_boxes_list(), batch.orig_sizes,
                           class_scores=logits, labels=batch.labels)
        print(acc.compute().as_dict())

    Samples repeated only to give DDP ranks equal batch counts must be left out of the update
    (index the batch with ``~batch.is_padding``), or they are counted twice.
    """

    def __init__(
        self,
        thresholds: np.ndarray | torch.Tensor | Sequence[float],
        iou_deltas: Sequence[int] = (30, 50, 70),
        *,
        largest_contour: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.thresholds = check_thresholds(thresholds)
        deltas = tuple(int(d) for d in iou_deltas)
        if not deltas or any(not 0 < d <= 100 for d in deltas) or len(set(deltas)) != len(deltas):
            raise ValueError(f"iou_deltas must be distinct percentages in 1..100, got {iou_deltas}")
        self.iou_deltas = deltas
        self.largest_contour = bool(largest_contour)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Row m: the cut level of every threshold for a map whose maximum is m.
        self._cut_table = torch.from_numpy(cut_level_table(self.thresholds)).to(self.device)
        # delta / 100 as the protocol computes it (a Python float), compared in float64.
        self._iou_cuts = torch.tensor([d / 100 for d in deltas], dtype=torch.float64, device=self.device)
        self._state = torch.zeros((len(deltas) + 2, len(self.thresholds) + 1), dtype=torch.int64, device=self.device)

    # ---------------------------------------------------------------------------------------
    # State
    # ---------------------------------------------------------------------------------------

    @property
    def num_thresholds(self) -> int:
        return len(self.thresholds)

    @property
    def correct(self) -> torch.Tensor:
        """``int64 [D, T]``: per IoU delta and threshold, the number of correctly localized images."""
        return self._state[: len(self.iou_deltas), :-1]

    @property
    def num_images(self) -> int:
        return int(self._state[0, -1])

    def reset(self) -> None:
        self._state.zero_()

    def state_tensor(self) -> torch.Tensor:
        """A copy of the count state ``int64 [D + 2, T + 1]`` on :attr:`device`, ready to all-reduce."""
        return self._state.clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the counts with ``state`` (e.g. after ``all_reduce``), checking its shape."""
        if tuple(state.shape) != tuple(self._state.shape):
            raise ValueError(
                f"state tensor shape {tuple(state.shape)} does not match this accumulator's "
                f"{tuple(self._state.shape)} (same thresholds and iou_deltas?)"
            )
        self._state.copy_(state.to(self.device, torch.int64))

    @classmethod
    def from_state_tensor(
        cls,
        state: torch.Tensor,
        thresholds: np.ndarray | torch.Tensor | Sequence[float],
        iou_deltas: Sequence[int] = (30, 50, 70),
        *,
        largest_contour: bool = False,
    ) -> MaxBoxAccumulator:
        """An accumulator holding ``state``, on the state's device."""
        acc = cls(thresholds, iou_deltas, largest_contour=largest_contour, device=state.device)
        acc.load_state_tensor(state)
        return acc

    def merge(self, other: MaxBoxAccumulator) -> MaxBoxAccumulator:
        """Add ``other``'s counts to this accumulator (same configuration required); returns self."""
        if (
            other.iou_deltas != self.iou_deltas
            or other.largest_contour != self.largest_contour
            or not np.array_equal(other.thresholds, self.thresholds)
        ):
            raise ValueError("cannot merge accumulators with different thresholds, deltas or mode")
        self._state += other._state.to(self.device)
        return self

    # ---------------------------------------------------------------------------------------
    # Updates
    # ---------------------------------------------------------------------------------------

    def update(
        self,
        maps: torch.Tensor | np.ndarray,
        gt_boxes: Sequence[torch.Tensor | np.ndarray],
        *,
        class_scores: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Count a batch of prepared maps.

        Args:
            maps: ``uint8 [N, H, W]`` maps quantized the protocol's way (:func:`prepare_maps`).
            gt_boxes: per image, integer ``[k_i, 4]`` boxes in map coordinates (inclusive corners;
                :func:`rescale_boxes` converts original-image boxes).
            class_scores: optional ``[N, C]`` logits or probabilities, for Top-1 / Top-5 Loc.
            labels: ``[N]`` GT class indices, required with ``class_scores``.

        Raises:
            ValueError: bad shapes, dtypes or boxes; the message names the image index.
        """
        maps_np = as_uint8_maps(maps)
        n, height, width = maps_np.shape
        gt, offsets = flatten_gt_boxes(gt_boxes, n, height, width)
        top1 = top5 = None
        if class_scores is not None or labels is not None:
            top1, top5 = self._class_hits(class_scores, labels, n)
        if n == 0:
            return
        levels = best_iou_per_level(maps_np, gt, offsets, largest_contour=self.largest_contour)
        level_iou = torch.from_numpy(levels.iou).to(self.device)
        map_max = torch.from_numpy(levels.map_max.astype(np.int64)).to(self.device)
        iou = level_iou.gather(1, self._cut_table[map_max])  # [N, T]
        self._count(iou, top1, top5)

    def update_raw(
        self,
        maps: torch.Tensor | np.ndarray,
        gt_boxes: Sequence[torch.Tensor | np.ndarray],
        orig_sizes: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
        *,
        class_scores: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Count a batch of raw model maps: float ``[N, h, w]`` of any size, boxes in original pixels.

        Prepares the maps (bicubic resize to 224, min-max normalization, uint8) on their device
        and rescales the boxes with ``orig_sizes`` (``[N, 2]`` width, height), then
        :meth:`update`.
        """
        prepared = prepare_maps(maps, EVAL_SIZE)
        self.update(
            prepared,
            rescale_boxes(gt_boxes, orig_sizes, EVAL_SIZE),
            class_scores=class_scores,
            labels=labels,
        )

    def update_from_iou(
        self,
        best_iou: torch.Tensor | np.ndarray,
        *,
        class_scores: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Count precomputed per-threshold best IoUs ``float [N, T]`` (e.g. from
        :func:`~wsol_core.metrics.boxes.best_iou_per_threshold`)."""
        iou = torch.as_tensor(best_iou).to(self.device, torch.float64)
        if iou.ndim != 2 or iou.shape[1] != self.num_thresholds:
            raise ValueError(f"best_iou must be [N, {self.num_thresholds}], got {tuple(iou.shape)}")
        top1 = top5 = None
        if class_scores is not None or labels is not None:
            top1, top5 = self._class_hits(class_scores, labels, len(iou))
        self._count(iou, top1, top5)

    def _class_hits(
        self, class_scores: torch.Tensor | None, labels: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if class_scores is None or labels is None:
            raise ValueError("class_scores and labels must be given together")
        scores = torch.as_tensor(class_scores).detach().to(self.device)
        labels = torch.as_tensor(labels).detach().to(self.device)
        if scores.ndim != 2 or len(scores) != n or labels.shape != (n,):
            raise ValueError(
                f"class_scores must be [{n}, C] and labels [{n}], got {tuple(scores.shape)} and {tuple(labels.shape)}"
            )
        bad = (labels < 0) | (labels >= scores.shape[1])
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"labels[{i}] = {int(labels[i])} is not a class index in [0, {scores.shape[1]})")
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        return hits[:, 0], hits.any(1)

    def _count(self, iou: torch.Tensor, top1: torch.Tensor | None, top5: torch.Tensor | None) -> None:
        d = len(self.iou_deltas)
        hits = iou[:, None, :] >= self._iou_cuts[None, :, None]  # [N, D, T]
        self._state[:d, :-1] += hits.sum(0)
        self._state[:d, -1] += len(iou)
        if top1 is not None and top5 is not None:  # both given together (labelled data)
            located = iou >= LOC_IOU / 100
            self._state[d, :-1] += (located & top1[:, None]).sum(0)
            self._state[d + 1, :-1] += (located & top5[:, None]).sum(0)
            self._state[d : d + 2, -1] += len(iou)

    # ---------------------------------------------------------------------------------------
    # Result
    # ---------------------------------------------------------------------------------------

    def compute(self, loc_threshold_index: int | None = None) -> BoxAccuracy:
        """The metrics from the counts.

        Args:
            loc_threshold_index: threshold index at which GT-known / Top-1 / Top-5 Loc are read.
                By default the threshold maximizing ``BoxAcc(t, 50)`` on these images; pass the
                index chosen on a validation split to report a test split the way the protocol
                prescribes (thresholds are hyperparameters chosen on held-out data).

        Raises:
            ValueError: no image counted, or class scores given for only part of the images.
        """
        state = self._state.cpu().numpy()
        d = len(self.iou_deltas)
        n = int(state[0, -1])
        if n == 0:
            raise ValueError("no images were counted")
        curves, max_acc, best_thr, best_idx = {}, {}, {}, {}
        for row, delta in enumerate(self.iou_deltas):
            curve = state[row, :-1] * 100.0 / n
            index = int(np.argmax(curve))
            curves[delta] = curve
            max_acc[delta] = float(curve[index])
            best_thr[delta] = float(self.thresholds[index])
            best_idx[delta] = index
        if loc_threshold_index is None and LOC_IOU in self.iou_deltas:
            loc_threshold_index = best_idx[LOC_IOU]
        loc: dict[str, float | None] = {"loc_threshold": None, "gt_known_loc": None, "top1_loc": None, "top5_loc": None}
        if loc_threshold_index is not None:
            t = int(loc_threshold_index)
            if not 0 <= t < self.num_thresholds:
                raise ValueError(f"loc_threshold_index {t} is outside [0, {self.num_thresholds})")
            loc["loc_threshold"] = float(self.thresholds[t])
            if LOC_IOU in self.iou_deltas:
                loc["gt_known_loc"] = float(state[self.iou_deltas.index(LOC_IOU), t] * 100.0 / n)
            n_classified = int(state[d, -1])
            if n_classified:
                if n_classified != n:
                    raise ValueError(
                        f"class scores were given for {n_classified} of {n} images; Top-1/Top-5 "
                        "Loc need them for every image"
                    )
                loc["top1_loc"] = float(state[d, t] * 100.0 / n)
                loc["top5_loc"] = float(state[d + 1, t] * 100.0 / n)
        return BoxAccuracy(
            thresholds=self.thresholds.copy(),
            iou_deltas=self.iou_deltas,
            curves=curves,
            max_box_acc=max_acc,
            best_threshold=best_thr,
            best_threshold_index=best_idx,
            max_box_acc_v2=float(np.mean([max_acc[delta] for delta in self.iou_deltas])),
            num_images=n,
            largest_contour=self.largest_contour,
            **loc,
        )
