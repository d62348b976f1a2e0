"""Loading ImageNet weights into the protocol's modified backbones, with an honest report.

Pretrained weights live apart from the architecture: a backbone is always built empty, then
:func:`load_pretrained` copies a torchvision-format state dict into it. Each backbone keeps
torchvision's parameter names, so the only remapping is dropping what the protocol removed
(VGG's fully connected ``classifier``, ResNet's ``fc``, Inception's ``Mixed_7*``, ``AuxLogits``
and ``fc``) and leaving the protocol's new layers (``conv6``, the SPG convs) at their fresh
initialization. Anything else that does not match is an error, never a silent skip.

A training checkpoint of this project (a checkpoint directory, or its ``state.pt``) is a source
too: its method's ``backbone.*`` weights, for any backbone including ``tiny``, must match the
architecture exactly. This is how a method starts from a classifier trained with labels on the
same data, the way the papers start from ImageNet-supervised weights (BENCHMARKS.md: C2AM on the
synthetic benchmark).

:func:`wsol_core.models.export.export_trunk` goes the other way. The tiny backbone loads such a
file like VGG16 loads ImageNet weights: its blocks from the file, its ``conv6`` new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wsol_core.models.base import Backbone

# Source keys the protocol drops, and target keys it adds, per backbone class name (what a
# torchvision-format file of that backbone holds beyond it, and what it never holds).
DROPPED_SOURCE_PREFIXES = {
    "VGG16": ("classifier.",),
    "ResNet50": ("fc.",),
    "InceptionV3": ("Mixed_7", "AuxLogits.", "fc."),
    "TinyCNN": ("fc.",),
}
NEW_TARGET_PREFIXES = {
    "VGG16": ("conv6.",),
    "ResNet50": (),
    "InceptionV3": ("SPG_A3_1b.", "SPG_A3_2b."),
    "TinyCNN": ("conv6.",),  # VGG16-GAP's shape: the last stage is the protocol's new conv6
}
_TORCHVISION_WEIGHTS = {
    "VGG16": ("VGG16_Weights", "IMAGENET1K_V1"),
    "ResNet50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "InceptionV3": ("Inception_V3_Weights", "IMAGENET1K_V1"),
}


class PretrainedMismatchError(RuntimeError):
    """The weights do not fit the backbone beyond the protocol's expected differences."""


@dataclass
class LoadReport:
    loaded: list[str]
    dropped: list[str]  # source keys the protocol removes (expected)
    fresh: list[str]  # target keys the protocol adds (expected, left at their init)

    def summary(self) -> str:
        return f"loaded {len(self.loaded)} tensors, dropped {len(self.dropped)} (protocol), kept {len(self.fresh)} new"


def _read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {str(path)!r} do not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise PretrainedMismatchError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _torchvision_state_dict(backbone: Backbone) -> dict[str, torch.Tensor]:
    import torchvision.models as tvm

    kind = type(backbone).__name__
    if kind not in _TORCHVISION_WEIGHTS:
        raise PretrainedMismatchError(
            f"{kind} has no torchvision weights; pretrain a trunk with `wsol-pretrain-trunk` and pass its file, "
            f"or start from a training checkpoint of this project"
        )
    enum_name, member = _TORCHVISION_WEIGHTS[kind]
    weights = getattr(getattr(tvm, enum_name), member)
    return weights.get_state_dict(progress=True)  # downloads: online machines only


def _training_checkpoint(source: str | Path) -> Path | None:
    """``source``'s ``state.pt`` when it is one of this project's training checkpoints."""
    from wsol_core.checkpoint import STATE_FILE

    path = Path(source)
    if path.is_dir() and (path / STATE_FILE).is_file():
        return path / STATE_FILE
    return path if path.name == STATE_FILE and path.is_file() else None


def load_backbone_from_checkpoint(backbone: Backbone, state_file: Path) -> LoadReport:
    """The ``backbone.*`` weights of a training checkpoint, which must fit ``backbone`` exactly."""
    from wsol_core.checkpoint import load_model_weights

    model, config = load_model_weights(state_file)
    trained = config.get("model", {}).get("backbone", "?")
    state = {k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")}
    target = backbone.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong_shape = sorted(
        f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise PretrainedMismatchError(
            f"{type(backbone).__name__} <- {state_file} (a {trained!r} checkpoint): missing {missing[:5]} ({len(missing)}), "
            f"not in the model {unexpected[:5]} ({len(unexpected)}), shape mismatch {wrong_shape[:3]}"
        )
    backbone.load_state_dict(state)
    return LoadReport(loaded=sorted(state), dropped=[], fresh=[])


def load_pretrained(backbone: Backbone, source: str | Path) -> LoadReport:
    """Copy pretrained weights into ``backbone``: ``source`` is ``"torchvision"``, a
    torchvision-format state dict file, or one of this project's training checkpoints."""
    state_file = _training_checkpoint(source) if str(source) != "torchvision" else None
    if state_file is not None:
        return load_backbone_from_checkpoint(backbone, state_file)
    kind = type(backbone).__name__
    if kind not in DROPPED_SOURCE_PREFIXES:
        raise PretrainedMismatchError(
            f"{kind} has no ImageNet-pretrained form; train it from scratch or start from a training checkpoint of this project"
        )
    state = _torchvision_state_dict(backbone) if str(source) == "torchvision" else _read_state_dict(source)
    target = backbone.state_dict()
    dropped_prefixes, new_prefixes = DROPPED_SOURCE_PREFIXES[kind], NEW_TARGET_PREFIXES[kind]

    dropped = sorted(k for k in state if k not in target and k.startswith(dropped_prefixes))
    unexpected = sorted(k for k in state if k not in target and not k.startswith(dropped_prefixes))
    fresh = sorted(k for k in target if k not in state and k.startswith(new_prefixes))
    missing = sorted(k for k in target if k not in state and not k.startswith(new_prefixes))
    wrong_shape = sorted(
        f"{k}: weights {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    )
    problems = []
    if missing:
        problems.append(
            f"missing from the weights: {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)})"
        )
    if unexpected:
        problems.append(
            f"not in the model: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})"
        )
    if wrong_shape:
        problems.append(f"shape mismatch: {wrong_shape[:5]}")
    if problems:
        raise PretrainedMismatchError(f"{kind} <- {source}: " + "; ".join(problems))

    loaded = sorted(k for k in target if k in state)
    backbone.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return LoadReport(loaded=loaded, dropped=dropped, fresh=fresh)
