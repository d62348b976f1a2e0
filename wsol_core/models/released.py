"""The field's released checkpoints, loaded into this project's methods.

Two layouts are read, both as state dicts (``torch.load(weights_only=True)``; a ``state_dict``
wrapper and DataParallel's ``module.`` prefix are taken off):

* **clovaai/wsolevaluation** (Choe et al., CVPR 2020): its CAM models (``VggCam``,
  ``ResNetCam``, ``InceptionCam``; also what its HaS and CutMix runs save, which share CAM's
  architecture). The backbone keys are torchvision's, as ours; what differs:

  - the classifier is ``fc.*`` at the top level (ours: ``head.fc.*``); InceptionV3's is the
    1x1 class-map conv ``SPG_A4`` (``[K, 1024, 1, 1]``), which is our linear head on the same
    features (a 1x1 conv then GAP equals GAP then the linear map);
  - VGG16 at 28x28 deletes ``pool4`` from ``features``, so its conv5 layers sit at indices 23, 25,
    27 where ours (which keep the pool as an ``Identity``) have 24, 26, 28. The layout tells the
    map size: a convolution at index 23 exists only at 28x28. ResNet50's and InceptionV3's map
    size is not in the weights: give ``model.large_feature_map`` as the run used it.

* **CVI-SZU/CCAM** (Xie et al., CVPR 2022, C2AM): ``backbone.*`` (ResNet50, layer4 at stride
  1, the features ``cat(layer4, layer3)``) and ``ac_head.activation_head`` / ``ac_head.bn_head``;
  the checkpoint's ``Flag`` says the map came out inverted (``ccam = 1 - ccam`` in their test
  code), which is our ``orientation`` of -1.

Each converter returns the config overrides that build the matching method and the converted
state dict, which must then load with ``strict=True``: a key left over or missing is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LAYOUTS = ("wsolevaluation", "ccam")

# wsolevaluation's VGG16 28x28 features: conv5_1..3 at 23, 25, 27 (pool4 deleted); ours at +1.
_VGG28_SHIFT = {23: 24, 25: 26, 27: 28}


class ReleasedCheckpointError(ValueError):
    """The file is not a checkpoint of a layout this module reads, or does not fit it."""


@dataclass
class ReleasedCheckpoint:
    layout: str
    overrides: list[str]  # config overrides that build the matching method
    state_dict: dict[str, torch.Tensor]  # in this project's key names
    num_classes: int
    note: str = ""


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict of a released file (weights only) and the other top-level entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file or a non-weights pickle
        raise ReleasedCheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({exc})") from None
    extras: dict[str, Any] = {}
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        extras = {k: v for k, v in payload.items() if k != "state_dict"}
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ReleasedCheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in payload.items()}, extras


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("ac_head.") for k in state):
        return "ccam"
    if "fc.weight" in state or "SPG_A4.weight" in state:
        return "wsolevaluation"
    raise ReleasedCheckpointError(
        "not a released checkpoint this project reads: no 'fc.weight' / 'SPG_A4.weight' "
        f"(wsolevaluation) and no 'ac_head.*' (CCAM); first keys {sorted(state)[:5]}"
    )


def convert_wsolevaluation(state: dict[str, torch.Tensor], large_feature_map: bool | None = None) -> ReleasedCheckpoint:
    """A wsolevaluation CAM model as this project's ``cam`` method."""
    if "features.0.weight" in state:
        backbone = "vgg16"
        vgg28 = "features.23.weight" in state
        if large_feature_map is not None and large_feature_map != vgg28:
            raise ReleasedCheckpointError(
                f"model.large_feature_map={large_feature_map} but the VGG16 weights are the {'28x28' if vgg28 else '14x14'} layout"
            )
        large_feature_map = vgg28
    elif "layer4.0.conv1.weight" in state:
        backbone = "resnet50"
    elif "Mixed_6e.branch1x1.conv.weight" in state:
        backbone = "inception_v3"
    else:
        raise ReleasedCheckpointError(f"wsolevaluation layout with an unknown backbone; first keys {sorted(state)[:5]}")
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("features.") and backbone == "vgg16":
            _, index, rest = key.split(".", 2)
            if large_feature_map:
                index = str(_VGG28_SHIFT.get(int(index), int(index)))
            converted[f"backbone.features.{index}.{rest}"] = value
        elif key.startswith("fc."):
            converted[f"head.{key}"] = value
        elif key == "SPG_A4.weight":
            if value.ndim != 4 or value.shape[2:] != (1, 1):
                raise ReleasedCheckpointError(f"SPG_A4.weight has shape {tuple(value.shape)}, expected [K, 1024, 1, 1]")
            converted["head.fc.weight"] = value[:, :, 0, 0].clone()
        elif key == "SPG_A4.bias":
            converted["head.fc.bias"] = value
        else:
            converted[f"backbone.{key}"] = value
    num_classes = int(converted["head.fc.weight"].shape[0])
    overrides = [
        "method.name=cam",
        f"model.backbone={backbone}",
        f"model.large_feature_map={bool(large_feature_map)}",
        f"model.num_classes={num_classes}",
    ]
    note = (
        ""
        if backbone == "vgg16" or large_feature_map is not None
        else (
            f"{backbone}: the map size is not in the weights; model.large_feature_map=false assumed (set it as the run did)"
        )
    )
    return ReleasedCheckpoint("wsolevaluation", overrides, converted, num_classes, note)


def convert_ccam(state: dict[str, torch.Tensor], extras: dict[str, Any]) -> ReleasedCheckpoint:
    """A CCAM (C2AM) model as this project's ``c2am`` method with ``concat_stage=layer3``."""
    if "backbone.layer4.0.conv1.weight" not in state:
        raise ReleasedCheckpointError(
            "CCAM layout without a ResNet50 'backbone.layer4'; only the ResNet50 release is read"
        )
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("ac_head."):
            converted[key.removeprefix("ac_head.")] = value
        elif key.startswith("backbone."):
            converted[key] = value
        else:
            raise ReleasedCheckpointError(f"CCAM layout: unexpected key {key!r}")
    flag = extras.get("Flag", False)
    inverted = bool(flag.item() if isinstance(flag, torch.Tensor) else flag)
    converted["orientation"] = torch.tensor(-1.0 if inverted else 1.0)
    converted["orientation_calibrated"] = torch.tensor(True)
    overrides = [
        "method.name=c2am",
        "model.backbone=resnet50",
        "model.large_feature_map=false",
        "method.concat_stage=layer3",
        "method.probe_classifier=false",
    ]
    note = "CCAM checkpoint: the map is inverted (Flag)" if inverted else ""
    return ReleasedCheckpoint("ccam", overrides, converted, 0, note)


def convert_released(
    path: str | Path, layout: str = "auto", large_feature_map: bool | None = None
) -> ReleasedCheckpoint:
    """Read ``path`` and convert it (``layout``: ``auto``, ``wsolevaluation`` or ``ccam``)."""
    state, extras = read_checkpoint(path)
    found = detect_layout(state)
    if layout not in ("auto", *LAYOUTS):
        raise ReleasedCheckpointError(f"layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if layout != "auto" and layout != found:
        raise ReleasedCheckpointError(f"{path}: asked for the {layout} layout but the keys are {found}'s")
    if found == "ccam":
        return convert_ccam(state, extras)
    return convert_wsolevaluation(state, large_feature_map)
