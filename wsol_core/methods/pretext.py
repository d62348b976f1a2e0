"""CAML's pretext geometry (Sec. 3.2): the transforms ``T`` whose labels the self-supervised
heads predict, applied per image with per-image labels, and their inverses ``T^-1`` that bring
the transformed views' maps back onto the original image for eq. 3-4.

Rotation and flips are exact (index permutations); scale and translation resample bilinearly
(``grid_sample``), filled by each transform's own padding going forward and by zeros going back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the config lives with the method (caml.py), which imports this module
    from wsol_core.methods.caml import PretextConfig


def _where(condition: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(condition.view(-1, *([1] * (a.dim() - 1))), a, b)


def _affine(x: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """``grid_sample`` with per-sample 2x3 ``theta`` (output -> input normalized coordinates)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


class PretextTransform:
    """A discrete family of image transforms indexed by per-image labels (label 0 is the identity
    for rotation, flips and translation; for scale the class whose factor is 1.0)."""

    name: str = ""
    num_classes: int = 0

    def forward(self, x: torch.Tensor, labels: torch.Tensor, padding: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, x: torch.Tensor, labels: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
        raise NotImplementedError


class Rotation(PretextTransform):
    """Rotation by ``label`` quarter turns (``torch.rot90`` over (h, w)); exact; square inputs."""

    name = "rotation"
    num_classes = 4

    def forward(self, x, labels, padding=None):
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"the rotation pretext task needs square inputs, got {tuple(x.shape[-2:])}")
        out = x
        for quarter in (1, 2, 3):
            out = _where(labels == quarter, torch.rot90(x, quarter, dims=(-2, -1)), out)
        return out

    def inverse(self, x, labels, padding="zeros"):
        return self.forward(x, (4 - labels) % 4)


class Flip(PretextTransform):
    """Horizontal (``dim=-1``) or vertical (``dim=-2``) flip for label 1; exact, self-inverse."""

    num_classes = 2

    def __init__(self, name: str, dim: int) -> None:
        self.name = name
        self.dim = dim

    def forward(self, x, labels, padding=None):
        return _where(labels == 1, x.flip(self.dim), x)

    def inverse(self, x, labels, padding="zeros"):
        return self.forward(x, labels)


class Scale(PretextTransform):
    """Magnify the content about the centre by ``factors[label]``; reflection fill (Sec. 4.2)."""

    name = "scale"

    def __init__(self, factors: tuple[float, ...]) -> None:
        self.factors = tuple(float(f) for f in factors)
        self.num_classes = len(self.factors)

    def _theta(self, labels: torch.Tensor, power: float) -> torch.Tensor:
        table = torch.tensor(self.factors, dtype=torch.float32, device=labels.device)
        s = table[labels] ** power  # sampling scale: output coordinate u reads input u * s
        theta = torch.zeros(labels.shape[0], 2, 3, dtype=torch.float32, device=labels.device)
        theta[:, 0, 0] = s
        theta[:, 1, 1] = s
        return theta

    def _identity(self, labels: torch.Tensor) -> torch.Tensor:
        table = torch.tensor([f == 1.0 for f in self.factors], device=labels.device)
        return table[labels]

    def forward(self, x, labels, padding=None):
        out = _affine(x, self._theta(labels, -1.0), padding or "reflection")
        return _where(self._identity(labels), x, out)

    def inverse(self, x, labels, padding="zeros"):
        return _where(self._identity(labels), x, _affine(x, self._theta(labels, 1.0), padding))


class Translation(PretextTransform):
    """Shift the content by ``shift`` of the side: identity, right, left, down, up; zero fill."""

    name = "translation"
    num_classes = 5

    def __init__(self, shift: float) -> None:
        self.shift = float(shift)

    def _theta(self, labels: torch.Tensor, sign: float) -> torch.Tensor:
        s = self.shift
        table = torch.tensor([[0, 0], [s, 0], [-s, 0], [0, s], [0, -s]], dtype=torch.float32, device=labels.device)
        offset = table[labels] * (2.0 * sign)  # normalized coordinates span 2 per side
        theta = torch.zeros(labels.shape[0], 2, 3, dtype=torch.float32, device=labels.device)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        theta[:, :, 2] = -offset  # output u reads input u - offset: content moves by +offset
        return theta

    def forward(self, x, labels, padding=None):
        return _where(labels == 0, x, _affine(x, self._theta(labels, 1.0), padding or "zeros"))

    def inverse(self, x, labels, padding="zeros"):
        return _where(labels == 0, x, _affine(x, self._theta(labels, -1.0), padding))


def build_transforms(cfg: PretextConfig) -> dict[str, PretextTransform]:
    every = {
        "rotation": Rotation(),
        "scale": Scale(cfg.scale.factors),
        "translation": Translation(cfg.translation.shift),
        "hflip": Flip("hflip", -1),
        "vflip": Flip("vflip", -2),
    }
    return {name: every[name] for name in cfg.transforms}


def apply_ops(
    x: torch.Tensor, ops: list[tuple[PretextTransform, torch.Tensor]], padding: str | None = None
) -> torch.Tensor:
    """``T``: the ops in order (``padding`` None = each transform's own fill)."""
    for transform, labels in ops:
        x = transform.forward(x, labels, padding)
    return x


def invert_ops(x: torch.Tensor, ops: list[tuple[PretextTransform, torch.Tensor]]) -> torch.Tensor:
    """``T^-1``: the inverses in reverse order, zero fill."""
    for transform, labels in reversed(ops):
        x = transform.inverse(x, labels, "zeros")
    return x
