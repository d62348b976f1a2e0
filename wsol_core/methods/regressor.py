"""A class-agnostic box regressor trained on pseudo boxes: the second stage of C2AM Sec. 3.4.

C2AM (seed 004, Sec. 3.4) reports its best WSOL numbers by training "a class-agnostic object
localization network" on the boxes extracted from its activation maps, following PSOL (Zhang,
Wei, Wu, Cai, Lu, Nguyen, Do, "Rethinking the Route Towards Weakly Supervised Object
Localization", CVPR 2020), and classifying with a separate network. The design here is PSOL's as
CVI-SZU/CCAM releases it (``WSOL/PSOL``):

- **model** (``models/models.py``, ``choose_locmodel``): the backbone, global average pooling,
  then ``Linear(C, 512) -> ReLU -> Linear(512, 4) -> Sigmoid`` (``hidden`` = 512) for ResNet50,
  DenseNet161 and InceptionV3 (``pool = "gap"``, the default). For VGG16 the released model keeps
  the map's layout instead: ``x = self.features(x); x = x.view(x.size(0), -1)`` feeds VGG's fully
  connected layers, so each position has its own weights. ``pool = "grid"`` is that reading for
  any backbone: the map averaged to ``grid_size x grid_size`` cells (7, VGG16's map at 224 px),
  flattened into ``Linear(C * 7 * 7, hidden)``. A box needs to know *where*; after global
  pooling only what deep, zero-padded trunks encode about absolute position is left, which a
  shallow trunk does not have (BENCHMARKS.md: the tiny backbone's regressor with ``gap`` learns
  the mean box);
- **box parametrization** (``loader/cub_loader.py``): the four outputs are ``(x, y, w, h)`` of
  the box as fractions of the (augmented) input image: left, top, width, height;
- **loss** (``training_CUB.py``): ``lambda_reg * MSE(prediction, target)`` with
  ``lambda_reg = 50`` (``loss_weight``); ``nn.SmoothL1Loss`` is left commented out there
  (``loss = "smooth_l1"`` here);
- **learning rates**: the new head at twice the backbone's rate (``param_list``: ``'lr': 2 *
  lr`` for ``fc``); :meth:`BoxRegressor.param_groups` puts the whole backbone in the trunk group
  and only the box head in the head group, so ``optim.head_lr_mult = 2`` reproduces it.

**Targets.** Each training sample's pseudo box (``Batch.pseudo_boxes``, from the sidecar named
by ``data.pseudo_boxes``; never the GT boxes) is carried into the augmented image through the
crop window and mirroring the loader reports (DALI and the torch loader alike) (``Batch.views``; :func:`boxes_in_view`): the part
of the box inside the crop, normalized. PSOL's loader redraws a crop until it intersects the box
(``RandomResizedBBoxCrop``, up to 30 tries); our loaders draw crops without looking at boxes, so
a sample whose crop misses its box is left out of the loss (the share kept is logged as
``target_visible``).

**Maps.** The evaluation of this project reads maps; the regressor's map is its box drawn at the
input's resolution (1 inside, 0 outside), so every threshold of the protocol finds exactly that
box and GT-known Loc / MaxBoxAcc are the box's accuracy. A box covering the whole input is drawn
one column short: a constant map is zeroed by the protocol's min-max normalization (a changed
IoU of at most 1/224). The regressor has no classifier (``logits`` None): Top-1 / Top-5 Loc come
from pairing it with a separate classifier (``wsol-evaluate --classifier``), as PSOL does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsol_core.config_fields import MethodConfig, spec
from wsol_core.data.batch import Batch, boxes_in_view
from wsol_core.methods.base import Inference, WSOLMethod
from wsol_core.models.base import Backbone


@dataclass
class RegressorConfig(MethodConfig):
    """PSOL's box regressor (module docstring)."""

    TUNABLE: ClassVar[dict[str, str]] = {"lambda_reg": "loss_weight"}

    name: str = "regressor"
    # "gap": PSOL's ResNet / DenseNet / Inception head; "grid": its VGG16 reading (module docstring).
    pool: Literal["gap", "grid"] = "gap"
    grid_size: int = spec(7, ge=1, doc="cells a side of the grid pooling (pool = grid)")
    hidden: int = spec(512, ge=1, doc="width of the box head's hidden layer (PSOL: 512)")
    loss_weight: float = spec(50.0, gt=0.0, doc="lambda_reg (PSOL's training_CUB.py: 50)")
    loss: Literal["mse", "smooth_l1"] = "mse"


class BoxHead(nn.Module):
    """Pooling (global, or to a ``grid x grid`` layout), then ``Linear -> ReLU -> Linear(hidden, 4)
    -> Sigmoid``: ``(x, y, w, h)``."""

    def __init__(self, in_channels: int, hidden: int, grid: int = 1) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels * grid * grid, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 4)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.pool(features.float()).flatten(1)))


def xywh_to_corners(box: torch.Tensor) -> torch.Tensor:
    """``(x, y, w, h)`` fractions -> ``(x0, y0, x1, y1)`` fractions (not clipped)."""
    x, y, w, h = box.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def draw_boxes(corners: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, height, width]`` maps, 1 at the pixels whose centres lie in each box (fractions)."""
    xs = (torch.arange(width, device=corners.device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=corners.device, dtype=torch.float32) + 0.5) / height
    c = corners.float()
    inside_x = (xs[None] >= c[:, 0:1]) & (xs[None] <= c[:, 2:3])  # [B, W]
    inside_y = (ys[None] >= c[:, 1:2]) & (ys[None] <= c[:, 3:4])  # [B, H]
    maps = (inside_y[:, :, None] & inside_x[:, None, :]).float()
    full = maps.flatten(1).min(dim=1).values > 0  # constant maps are zeroed by min-max: leave a gap
    maps[full, :, -1] = 0.0
    return maps


class BoxRegressor(WSOLMethod):
    config_class = RegressorConfig
    cfg: RegressorConfig
    uses_labels = False  # class-agnostic: the box never depends on a label
    needs_pseudo_boxes = True

    def __init__(self, backbone: Backbone, num_classes: int, cfg: RegressorConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.box_head = BoxHead(backbone.out_channels, cfg.hidden, cfg.grid_size if cfg.pool == "grid" else 1)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        return {"box": self.box_head(self.backbone(images)), "input_size": torch.tensor(images.shape[-2:])}

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        if batch.pseudo_boxes is None:
            raise ValueError(
                "the regressor learns from pseudo boxes: set data.pseudo_boxes to a sidecar of jobs/extract_boxes.py"
            )
        if batch.views is None:
            raise ValueError("the regressor needs each crop's window (Batch.views): this batch's loader reported none")
        target, visible = boxes_in_view(batch.pseudo_boxes.float(), batch.views.float())
        x0, y0, x1, y1 = target.unbind(1)
        target_xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)
        prediction = outputs["box"].float()
        if self.cfg.loss == "mse":
            per_sample = F.mse_loss(prediction, target_xywh, reduction="none").mean(dim=1)
        else:
            per_sample = F.smooth_l1_loss(prediction, target_xywh, reduction="none").mean(dim=1)
        kept = visible.float()
        outputs["target_visible"] = kept.mean()
        outputs["target_area"] = ((x1 - x0) * (y1 - y0) * kept).sum() / kept.sum().clamp_min(1.0)
        return {"box": self.cfg.loss_weight * (per_sample * kept).sum() / kept.sum().clamp_min(1.0)}

    def diagnostics(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        box = outputs["box"].detach().float()
        stats = {"predicted_area": (box[:, 2] * box[:, 3]).mean()}
        for name in ("target_visible", "target_area"):  # set by losses() in training
            if name in outputs:
                stats[name] = outputs[name].detach()
        return stats

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The predicted box, drawn at the input's resolution."""
        height, width = (int(v) for v in outputs["input_size"].tolist())
        return {"box": draw_boxes(xywh_to_corners(outputs["box"].detach()), height, width)}

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        box = self.box_head(self.backbone(images))
        return Inference(logits=None, maps=draw_boxes(xywh_to_corners(box), images.shape[-2], images.shape[-1]))

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """PSOL's two groups: the whole backbone at ``lr``, the box head at ``lr * head_lr_mult``."""
        head = list(self.box_head.parameters())
        head_ids = {id(p) for p in head}
        trunk = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        return [
            {"params": trunk, "lr": lr, "name": "trunk"},
            {"params": head, "lr": lr * head_lr_mult, "name": "head"},
        ]
