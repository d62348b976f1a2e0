"""WSOL methods behind one interface (see :mod:`wsol_core.methods.base`), selected by name.

Method modules are imported on first use so that a method under development, or one whose
optional dependency is missing, cannot break the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

import torch

from wsol_core.config_fields import ConfigError, MethodConfig
from wsol_core.methods.base import Inference, WSOLMethod, select_classes

if TYPE_CHECKING:  # the config module imports this package to parse the method section
    from wsol_core.config import Config

# name -> (module, method class, config class)
_REGISTRY = {
    "cam": ("wsol_core.methods.cam", "CAM", "CAMConfig"),
    "fmcg": ("wsol_core.methods.fmcg", "FMCG", "FMCGConfig"),
    "icl": ("wsol_core.methods.icl", "ICL", "ICLConfig"),
    "caml": ("wsol_core.methods.caml", "CAML", "CAMLConfig"),
    "c2am": ("wsol_core.methods.c2am", "C2AM", "C2AMConfig"),
    "regressor": ("wsol_core.methods.regressor", "BoxRegressor", "RegressorConfig"),
}
METHOD_NAMES = tuple(_REGISTRY)


def _lookup(name: str, index: int) -> type:
    if name not in _REGISTRY:
        raise ConfigError(f"method.name = {name!r} is not a method; choose one of {list(METHOD_NAMES)}")
    module = import_module(_REGISTRY[name][0])
    return getattr(module, _REGISTRY[name][index])


def method_class(name: str) -> type[WSOLMethod]:
    return _lookup(name, 1)


def method_config_class(name: str) -> type[MethodConfig]:
    return _lookup(name, 2)


def method_configs() -> dict[str, type[MethodConfig]]:
    """Every method's config class, in the registry's order (CAM, FMCG, ICL, CAML, C2AM, then the
    second stage's box regressor)."""
    return {name: method_config_class(name) for name in METHOD_NAMES}


def tunable_parameters() -> dict[str, dict[str, str]]:
    """The search's short names: ``{short: {method: "method.<field>"}}``, from each config's ``TUNABLE``."""
    table: dict[str, dict[str, str]] = {}
    for name, config in method_configs().items():
        for short, dotted in config.TUNABLE.items():
            table.setdefault(short, {})[name] = f"method.{dotted}"
    return table


def switch_labels() -> dict[str, str]:
    """``{part: label}`` of every method's ablation switches, in the papers' column order."""
    return {part: label for config in method_configs().values() for part, label in config.SWITCHES.items()}


def ablation_variants() -> dict[str, list[str]]:
    """Each method as it is, then (where its paper has an ablation table) without each part. The
    box regressor is a second stage trained on another method's boxes, not a variant."""
    variants: dict[str, list[str]] = {}
    for name, config in method_configs().items():
        if method_class(name).needs_pseudo_boxes:
            continue
        variants[name] = [f"method.name={name}"]
        for part in config.ABLATED:
            variants[f"{name}-no-{part.replace('_', '-')}"] = [f"method.name={name}", f"method.{part}.enabled=false"]
    return variants


def build_method(cfg: Config, num_classes: int) -> WSOLMethod:
    """Backbone (with pretrained weights when configured) + method, from a validated config."""
    from wsol_core.models import build_backbone

    backbone = build_backbone(
        cfg.model.backbone, large_feature_map=cfg.model.large_feature_map, pretrained=cfg.model.pretrained
    )
    method = method_class(cfg.method.name)(backbone, num_classes, cfg.method)
    if backbone.protocol_classifier_init:
        init_protocol_classifiers(method)
    return method


def init_protocol_classifiers(method: WSOLMethod) -> None:
    """The evaluation protocol's classifier init, N(0, 0.01) weights and zero biases
    (wsolevaluation ``wsol/util.py`` ``initialize_weights``, for VGG16, ResNet50 and
    InceptionV3 alike), on every classifier head of the method (CAM heads, pretext heads,
    probes)."""
    from wsol_core.models.head import CAMHead

    for module in method.modules():
        if isinstance(module, CAMHead):
            torch.nn.init.normal_(module.fc.weight, 0.0, 0.01)
            torch.nn.init.zeros_(module.fc.bias)


__all__ = [
    "METHOD_NAMES",
    "Inference",
    "WSOLMethod",
    "build_method",
    "method_class",
    "method_config_class",
    "select_classes",
]
