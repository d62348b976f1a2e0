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
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    orig_sizes: torch.Tensor
    boxes: torch.Tensor
    num_boxes: torch.Tensor
    masks: torch.Tensor | None = None
    is_padding: torch.Tensor | None = None

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

    def gt_boxes_list(self) -> list[torch.Tensor]:
        """The valid GT boxes of each sample, ``[k_i, 4]`` each."""
        return [self.boxes[i, : int(n)] for i, n in enumerate(self.num_boxes.tolist())]
