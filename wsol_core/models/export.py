"""A classifier trained by this project, written as a torchvision-format state dict.

That is the form ImageNet weights come in, so a trunk pretrained here (``wsol-pretrain-trunk``:
the ImageNet proxy of issue 16, a trunk trained on a disjoint synthetic task) is fine-tuned
through ``model.pretrained=PATH`` exactly as real weights are (:func:`load_pretrained`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wsol_core.models import BACKBONES, backbone_class
from wsol_core.models.pretrained import DROPPED_SOURCE_PREFIXES, NEW_TARGET_PREFIXES, PretrainedMismatchError


def export_trunk(checkpoint: str | Path, out: str | Path) -> dict[str, torch.Tensor]:
    """Write a training checkpoint's backbone as a torchvision-format state dict at ``out``.

    The file holds what a torchvision classifier's file holds and the protocol keeps (the
    backbone's parameter names, without the ``module.``/``backbone.`` prefixes), plus the
    checkpoint's GAP classifier as ``fc.*`` where the backbone's torchvision form calls its
    classifier that (ResNet50, tiny): :func:`load_pretrained` drops it, as it drops ResNet's. The
    layers the protocol adds new (VGG16's and tiny's ``conv6``) are left out, so they start fresh
    in every fine-tuning, as they do from ImageNet weights. Written atomically.
    """
    from wsol_core.checkpoint import load_model_weights

    source = Path(checkpoint)
    model, config = load_model_weights(source)
    name = config.get("model", {}).get("backbone")
    if name not in BACKBONES:
        raise PretrainedMismatchError(
            f"{source}: not a training checkpoint of a known backbone (model.backbone={name!r})"
        )
    kind = backbone_class(name).__name__
    new_layers = NEW_TARGET_PREFIXES.get(kind, ())
    state = {
        key.removeprefix("backbone."): tensor
        for key, tensor in model.items()
        if key.startswith("backbone.") and not key.removeprefix("backbone.").startswith(new_layers)
    }
    if "fc." in DROPPED_SOURCE_PREFIXES.get(kind, ()):
        state |= {f"fc.{k.rsplit('.', 1)[1]}": v for k, v in model.items() if k in ("head.fc.weight", "head.fc.bias")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".tmp")
    torch.save(state, partial)
    partial.replace(out)
    return state
