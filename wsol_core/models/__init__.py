"""Backbones of the evaluation protocol plus a small CPU one, and the shared CAM head."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from wsol_core.models.base import Backbone, init_new_layers
from wsol_core.models.head import CAMHead
from wsol_core.models.pretrained import LoadReport, PretrainedMismatchError, load_pretrained
from wsol_core.models.tiny import TinyCNN

if TYPE_CHECKING:
    from wsol_core.models.inception import InceptionV3
    from wsol_core.models.resnet import ResNet50
    from wsol_core.models.vgg import VGG16

#: Each backbone's class by name, as ``module.Class``, imported when a backbone is built. The three
#: of the protocol build on torchvision, and importing torchvision imports ``torch._dynamo``: 1.5 s
#: of CPU beyond torch's own on the 2-core box, 5 s without bytecode (BENCHMARKS.md, "What a
#: process start costs"). A training process pays that anyway (autograd's backward imports it
#: too), but the processes that only read a ``Config`` (the job's driver, Ray Train's controller,
#: which unpickles the run's config, a Tune trial's driver) then never do.
BACKBONES: dict[str, str] = {
    "vgg16": "wsol_core.models.vgg.VGG16",
    "resnet50": "wsol_core.models.resnet.ResNet50",
    "inception_v3": "wsol_core.models.inception.InceptionV3",
    "tiny": "wsol_core.models.tiny.TinyCNN",
}


def backbone_class(name: str) -> type[Backbone]:
    """The class of the backbone called ``name`` (a key of :data:`BACKBONES`)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    module, _, cls = BACKBONES[name].rpartition(".")
    return getattr(import_module(module), cls)


def build_backbone(name: str, *, large_feature_map: bool = False, pretrained: str | None = None) -> Backbone:
    """An empty backbone by name, then (optionally) ImageNet weights from ``pretrained``."""
    backbone = backbone_class(name)(large_feature_map=large_feature_map)
    if pretrained:
        load_pretrained(backbone, pretrained)
    return backbone


_BY_CLASS_NAME = {path.rpartition(".")[2]: name for name, path in BACKBONES.items()}


def __getattr__(attr: str) -> type[Backbone]:
    """``wsol_core.models.VGG16`` and the other torchvision backbones, imported on first use (PEP 562)."""
    if attr in _BY_CLASS_NAME:
        return backbone_class(_BY_CLASS_NAME[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


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
    "backbone_class",
    "build_backbone",
    "init_new_layers",
    "load_pretrained",
]
