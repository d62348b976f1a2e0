"""Backbones of the evaluation protocol plus a small CPU one, and the shared CAM head."""

from __future__ import annotations

from wsol_core.models.base import Backbone, init_new_layers
from wsol_core.models.head import CAMHead
from wsol_core.models.inception import InceptionV3
from wsol_core.models.pretrained import LoadReport, PretrainedMismatchError, load_pretrained
from wsol_core.models.resnet import ResNet50
from wsol_core.models.tiny import TinyCNN
from wsol_core.models.vgg import VGG16

BACKBONES: dict[str, type[Backbone]] = {
    "vgg16": VGG16,
    "resnet50": ResNet50,
    "inception_v3": InceptionV3,
    "tiny": TinyCNN,
}


def build_backbone(name: str, *, large_feature_map: bool = False, pretrained: str | None = None) -> Backbone:
    """An empty backbone by name, then (optionally) ImageNet weights from ``pretrained``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    backbone = BACKBONES[name](large_feature_map=large_feature_map)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


__all__ = [
    "BACKBONES",
    "Backbone",
    "CAMHead",
    "InceptionV3",
    "LoadReport",
    "PretrainedMismatchError",
    "ResNet50",
    "TinyCNN",
    "VGG16",
    "build_backbone",
    "init_new_layers",
    "load_pretrained",
]
