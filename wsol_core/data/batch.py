"""The one batch structure every loader yields and every consumer reads.

DALI and the torch fallback both produce a :class:`Batch`; training, evaluation and the
methods' ``losses`` read nothing else, so switching loaders never changes downstream code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """A batch of WSOL samples.

    Attributes:
        images: ``[B, 3, H, W]`` float32, normalized, on the training device (channels_last
            memory format when the loader was asked for it).
        labels: ``[B]`` int64 class indices; ``-1`` for unlabeled (co-localization) samples.
        keys: the ``__key__`` of each sample, for error messages and pictures.
        orig_sizes: ``[B, 2]`` int64 original ``(width, height)`` of each image.
        boxes: ``[B, K, 4]`` float32 GT boxes ``x0, y0, x1, y1`` in original pixel coordinates
            (inclusive corners), padded with ``-1`` rows; ``K`` is the batch's largest count.
        num_boxes: ``[B]`` int64 number of valid rows of ``boxes`` per sample.
        masks: optional ``[B, 224, 224]`` uint8 PxAP masks (0 background, 1 foreground,
            255 ignore), already resized to the evaluation resolution.
        is_padding: ``[B]`` bool, True for samples repeated only to give every rank the same
            number of batches; evaluation must not count them.
        views: optional ``[B, 5]`` float32: the window of the original image that each batch
            image shows, ``x0, y0, x1, y1`` in continuous pixel coordinates (the image spans
            ``[0, W] x [0, H]``; pixel ``i`` covers ``[i, i + 1)``), then ``1.0`` if the window
            was mirrored. With it a box in original pixels can be carried into the augmented
            image (:func:`boxes_in_view`). Both loaders report it.
        pseudo_boxes: optional ``[B, 4]`` float32 pseudo box per sample (original pixels,
            inclusive corners) from a sidecar (``data.pseudo_boxes``, training split only):
            what a box regressor learns from, kept apart from the GT ``boxes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    orig_sizes: torch.Tensor
    boxes: torch.Tensor
    num_boxes: torch.Tensor
    masks: torch.Tensor | None = None
    is_padding: torch.Tensor | None = None
    views: torch.Tensor | None = None
    pseudo_boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return replace(self, **moved)

    def real_indices(self) -> list[int]:
        """The positions of the real samples (not the padding repeats)."""
        if self.is_padding is None:
            return list(range(len(self)))
        return (~self.is_padding).nonzero().squeeze(1).tolist()

    def gt_boxes_list(self) -> list[torch.Tensor]:
        """The valid GT boxes of each sample, ``[k_i, 4]`` each."""
        return [self.boxes[i, : int(n)] for i, n in enumerate(self.num_boxes.tolist())]


def boxes_in_view(boxes: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of the original images (``[B, 4]`` inclusive pixel corners) in the batch images:
    ``[B, 4]`` ``x0, y0, x1, y1`` as fractions of the batch image's width and height (the part of
    each box inside its window, mirrored with the window), and ``[B]`` bool: whether any of the
    box is inside the window (a random crop can miss the object)."""
    left, top, right, bottom, mirrored = views.unbind(1)
    width, height = (right - left).clamp_min(1e-6), (bottom - top).clamp_min(1e-6)
    # An inclusive pixel box x0..x1 covers [x0, x1 + 1) in continuous coordinates.
    x0 = ((boxes[:, 0] - left) / width).clamp(0, 1)
    x1 = ((boxes[:, 2] + 1 - left) / width).clamp(0, 1)
    y0 = ((boxes[:, 1] - top) / height).clamp(0, 1)
    y1 = ((boxes[:, 3] + 1 - top) / height).clamp(0, 1)
    flip = mirrored > 0.5
    x0, x1 = torch.where(flip, 1 - x1, x0), torch.where(flip, 1 - x0, x1)
    visible = (x1 > x0) & (y1 > y0)
    return torch.stack([x0, y0, x1, y1], dim=1), visible
