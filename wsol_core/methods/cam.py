"""CAM: the class activation map baseline (Zhou et al., "Learning Deep Features for
Discriminative Localization", CVPR 2016).

Train a GAP classifier with cross-entropy; the map of class ``k`` is ``M_k = sum_c w_kc f_c``
(their eq. 2) on the last feature map. Evaluated with the GT class's map (GT-known) as in the
protocol of Choe et al. (CVPR 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wsol_core.config_fields import MethodConfig
from wsol_core.data.batch import Batch
from wsol_core.methods.base import Inference, WSOLMethod, select_classes
from wsol_core.models.base import Backbone
from wsol_core.models.head import CAMHead


@dataclass
class CAMConfig(MethodConfig):
    name: str = "cam"


class CAM(WSOLMethod):
    config_class = CAMConfig
    cfg: CAMConfig  # what config_class guarantees (checked in WSOLMethod.__init__)

    def __init__(self, backbone: Backbone, num_classes: int, cfg: CAMConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.head = CAMHead(backbone.out_channels, num_classes)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        return {"logits": self.head(features), "features": features}

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        return {"cls": F.cross_entropy(outputs["logits"], batch.labels)}

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        features = self.backbone(images)
        logits = self.head(features)
        return Inference(logits=logits, maps=self.head.class_maps(features, select_classes(logits, labels)))
