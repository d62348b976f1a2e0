"""The protocol's optimizer: SGD over two learning-rate groups, step (or poly, or cosine) decay, optional warmup."""

from __future__ import annotations

import math

import torch

from wsol_core.config import OptimConfig
from wsol_core.methods.base import WSOLMethod


def build_optimizer(method: WSOLMethod, cfg: OptimConfig, device: torch.device) -> torch.optim.SGD:
    groups = [g for g in method.param_groups(cfg.lr, cfg.head_lr_mult) if g["params"]]
    # The fused kernel runs on CUDA; elsewhere the foreach implementation is the fast one.
    fused = cfg.fused and device.type == "cuda"
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        fused=fused or None,
    )


def lr_factor(step: int, steps_per_epoch: int, cfg: OptimConfig, epochs: int = 0) -> float:
    """Multiplier on each group's base lr at a global optimizer step.

    ``"step"``: ``lr_decay_factor`` every ``lr_decay_every`` epochs (the protocol's schedule);
    ``"poly"``: ``(1 - step / total_steps) ** poly_power`` over ``epochs`` (C2AM's released
    recipe, PolyOptimizer with power 0.9); ``"cosine"``: ``(1 + cos(pi * step / total_steps)) / 2``
    (PSOL's ``CosineAnnealingLR(optimizer, len(train_loader) * epochs)``, stepped per batch)."""
    epoch = step / max(steps_per_epoch, 1)
    total = max(epochs * steps_per_epoch, 1)
    if cfg.schedule == "poly":
        factor = max(1.0 - step / total, 0.0) ** cfg.poly_power
    elif cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    else:
        factor = cfg.lr_decay_factor ** math.floor(epoch / cfg.lr_decay_every)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        factor *= (epoch + 1.0 / max(steps_per_epoch, 1)) / cfg.warmup_epochs
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step, so a resumed run lands on the same lr. ``epochs`` (the
    run's length) is needed by the ``"poly"`` schedule."""
    if cfg.schedule in ("poly", "cosine") and epochs < 1:
        raise ValueError(f"optim.schedule = {cfg.schedule!r} needs the run's number of epochs")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg, epochs))
