"""The interface every WSOL method implements.

A method is an ``nn.Module`` made of a :class:`~wsol_core.models.base.Backbone`, a
:class:`~wsol_core.models.head.CAMHead` where it classifies, and its own parts. The training
loop, evaluation and Tune only ever call these operations:

``forward(images, labels=None, progress=0.0) -> dict[str, Tensor]``
    The training-time forward. ``progress`` in [0, 1] is the fraction of training done; it
    drives schedules (FMCG's drop threshold going from 1 to theta_drop). Outputs are a dict so
    methods can return their own intermediate tensors; ``"logits"`` is the class scores where
    the method has a classifier.
``losses(outputs, batch) -> dict[str, Tensor]``
    Named scalar loss terms, already weighted; the loop sums them and logs each as
    ``train/loss_<name>``.
``inference(images, labels=None) -> Inference``
    Logits (or None) and the localization map of each image from the paper's inference path.
``localization_maps(images, labels=None) -> Tensor[B, h, w]``
    The map that becomes boxes: the CAM of the GT class (or of the predicted class when
    ``labels`` is None) for supervised methods, the class-agnostic map for CAML and C2AM.

Seen, not trained (the loop and evaluation log these so that a dead term or a degenerate mask
shows at once in MLflow):

``loss_masks(outputs) -> dict[str, Tensor[B, h, w]]``
    The masks the loss terms use on the batch's original images, values in [0, 1] (binary, or
    soft for C2AM's activation map). Logged per epoch as ``train/mask_<name>_area`` and, on val,
    as ``val/mask_<name>_area`` and ``val/mask_<name>_in_box`` (the share of the mask inside
    the GT boxes).
``diagnostics(outputs) -> dict[str, Tensor]``
    Scalars a schedule or a term depends on (FMCG's theta_d), logged as ``train/<name>``.
``inference_variants(images, labels=None) -> dict[str, Tensor[B, h, w]]``
    Other readings of the paper's inference map, scored on val beside the configured one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from wsol_core.config_fields import MethodConfig
from wsol_core.data.batch import Batch
from wsol_core.models.base import Backbone


@dataclass
class Inference:
    logits: torch.Tensor | None  # [B, K], or None for a method without a classifier
    maps: torch.Tensor  # [B, h, w] localization maps, higher = more foreground


class WSOLMethod(nn.Module):
    """Base class: holds the backbone and config, and builds the protocol's parameter groups."""

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # False for co-localization methods whose maps never see a class label (CAML, C2AM).
    uses_labels: ClassVar[bool] = True
    # True for a second-stage model that learns from pseudo boxes (``Batch.pseudo_boxes``): it
    # needs ``data.pseudo_boxes`` and is not a variant of the WSOL ablations.
    needs_pseudo_boxes: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, num_classes: int, cfg: MethodConfig) -> None:
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.cfg = cfg

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        raise NotImplementedError

    @torch.no_grad()
    def localization_maps(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.inference(images, labels).maps

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks the loss terms use, ``[B, h, w]`` in [0, 1] per name (see the module docstring)."""
        return {}

    def diagnostics(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar tensors that schedules or terms depend on, per name."""
        return {}

    @torch.no_grad()
    def inference_variants(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Alternative inference maps ``[B, h, w]`` by name, for methods whose paper leaves the map open."""
        return {}

    def after_step(self, step: int, outputs: dict[str, torch.Tensor]) -> None:
        """Called by the loop on every rank after each optimizer step (``step`` counts from 1).

        For one-time decisions taken during training, such as C2AM's orientation check.
        """

    def after_epoch(self, epoch: int) -> None:
        """Called by the loop on every rank after each training epoch (``epoch`` counts from 1)."""

    def before_evaluation(self, images: torch.Tensor) -> None:
        """Called by the loop on every rank before an evaluation, with a batch of val images."""

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """The protocol's two groups: the pretrained trunk at ``lr``; the backbone's head stages,
        the classifier and every part the method adds at ``lr * head_lr_mult``."""
        trunk_names = {f"backbone.{n}" for n, _ in self.backbone.named_parameters()}
        trunk_names -= {f"backbone.{n}" for n in self.backbone.head_parameter_names()}
        trunk: list[nn.Parameter] = []
        head: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (trunk if name in trunk_names else head).append(param)
        return [
            {"params": trunk, "lr": lr, "name": "trunk"},
            {"params": head, "lr": lr * head_lr_mult, "name": "head"},
        ]


def select_classes(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The GT class where known (``>= 0``), else the top-1 prediction."""
    predicted = logits.argmax(dim=1)
    if labels is None:
        return predicted
    return torch.where(labels >= 0, labels, predicted)
