"""CAML: contrastive attention maps for self-supervised co-localization.

Ki, Uh, Choe, Byun, "Contrastive Attention Maps for Self-supervised Co-localization", ICCV 2021.
Equation, section and table numbers below are the paper's.

What is implemented
-------------------

- **PTAP, pixel-wise top-k attention pooling (Sec. 3.1).** Eq. 1: ECA channel attention
  (Wang et al., ECA-Net, CVPR 2020 [35]): GAP, a 1-D convolution across channels (ECA's adaptive
  kernel size ``|log2(C)/gamma + b/gamma|_odd`` or a configured one), sigmoid; the feature map is
  reweighted channel-wise, ``F_w = F_x (.) sigma(Conv1D(GAP(F_x)))`` (:class:`ECA`). Eq. 2: at
  every pixel the mean of the ``k`` largest channel values of ``F_w``; ``k = round(k_ratio * C)``
  clamped to [1, C], so ``k = C`` is channel-average pooling and ``k = 1`` channel-max pooling
  (:func:`ptap`). Default ``k_ratio = 0.7`` (Table 6, "top-70%").
- **Pretext tasks (Sec. 3.2, Table 7).** Rotation (4 classes: 0/90/180/270 degrees), scale,
  translation, horizontal flip, vertical flip (2 classes each for the flips), each with a per-image
  label drawn uniformly from its classes, the identity class included, as in RotNet [11] and the
  PsyNet code [2] that the paper reproduces (Table 7, "reproduced using official code"). Each
  transform has its own GAP + linear head trained with cross-entropy on the transformed images
  (eq. 6, "L_cls"). Classes: rotation ``r`` = ``torch.rot90`` by ``r`` quarter turns; scale =
  ``pretext.scale.factors`` (content magnification, identity = 1.0); translation = identity,
  right, left, down, up by ``pretext.translation.shift`` of the side; flips = identity, flipped.
- **Contrastive attention map loss (Sec. 3.2, eq. 3-4).** For an original image ``x`` and its
  transformed view ``T(x)`` (both through the backbone in ONE batched pass) with PTAP maps
  ``A_ori``, ``A_trans``: ``A_trans2ori = T^-1(A_trans)``, ``A_ori2trans = T(A_ori)``; eq. 3
  background maps ``A_(.)2bg = A_(.) (.) 1[(1 - A_(.)) > theta]`` with
  ``theta = theta_bg * min_pixels(1 - A_(.))`` per image (:func:`background_mask`); eq. 4 the sum
  of two triplet hinges with L2 distance ``d`` over the whole map and margin ``m``:
  ``[d(A_trans2ori, A_ori) - d(A_trans2ori, A_ori2bg) + m]_+`` and
  ``[d(A_ori2trans, A_trans) - d(A_ori2trans, A_trans2bg) + m]_+``, averaged over images
  (:func:`l2_distance`, :func:`triplet_hinge`). Defaults ``theta_bg = 2.3``, ``m = 1`` (Sec. 4).
- **Objective (eq. 5).** ``L = L_cls + L_caml``, returned as the terms ``cls`` and ``caml``.
- **Inference (Sec. 3.3).** The class-agnostic PTAP map ``A_ori`` (eq. 2) of the original image;
  no label is ever used for it (``uses_labels = False``).

Precisely what is contrasted (``caml.embedding``)
-------------------------------------------------

``"attention"`` (default, the paper's method): the anchors/positives/negatives are the
single-channel maps ``A`` ([B, h, w], after ``caml.map_activation``, see below); ``d`` is the L2
norm of their difference over all h*w pixels; the negative is the positive map itself with its
foreground pixels zeroed (eq. 3), i.e. nothing is pooled: fg and bg stay spatial maps.
``"feature"`` is Table 4's "L_caml w/ feature maps": the embeddings are ``A (.) F_w`` (the map
multiplied into every channel of the weighted feature map, [B, C, h, w]), transformed with the
same ``T`` / ``T^-1`` per channel, the negative masked by the same ``M_bg`` (from ``A``), ``d``
over C*h*w.

Ambiguities, and the defaults chosen
------------------------------------

- **What eq. 3-4 act on, and which background rule** (``caml.map_activation``,
  ``caml.bg_rule``). Eq. 3 as printed thresholds the reverse map: ``M_bg = 1[(1 - A) >
  theta_bg * min(1 - A)]`` with ``theta_bg = 2.3``; Sec. 4 words it differently: "The background
  threshold is set to minimum intensity of A_PTAP times pre-defined ratio θ_bg", i.e.
  ``1[A < theta_bg * min(A)]`` (``"map_min"``, scale-invariant). The paper never says how ``A``
  is scaled, yet eq. 4 compares L2 distances with the margin ``m = 1``. The readings, measured
  on the synthetic benchmark's upright form (tiny backbone, 150 steps of batch 32, SGD 0.01;
  BENCHMARKS.md "CAML: which reading keeps eq. 4 alive"):

  - ``"sigmoid"`` + ``"reverse_min"`` (this project's earlier default): PTAP pools ReLU
    features, so ``sigmoid(A) >= 0.5`` everywhere and the background is empty unless the raw
    peak exceeds ~1.28; and over h*w pixels ``d(a, n)`` (about 7.4) dwarfs ``m``. Measured: the
    background mask covered 0 % of the map and 0 of the hinges were active in every step: the
    loss never trained anything (Table 3's "-L_caml" row in disguise).
  - ``"l2"`` + ``"map_min"`` (default): each map divided by its L2 norm over the h*w pixels,
    so ``d`` lies in [0, 2] on the scale of ``m = 1``, and the negative ``A (.) M_bg`` has at
    most unit norm: the hinge ``d(a, p) - ||a outside M_bg|| + 1`` stays active until the two
    views agree AND the map's energy has left the background. Measured: 100 % of hinges
    active, the loss falling from 0.31 to 0.04, the background mask 59 % -> 31 % of the map
    with 0.2-4 % of it inside the GT box.
  - ``"l2"`` + ``"reverse_min"``: ``min(1 - A) = 1 - max(A)`` and a unit-L2 map's peak is far
    below 1 (e.g. 0.2), so ``theta >= 1`` and the background is empty again.
  - ``"none"`` (the raw eq. 2 map) + ``"map_min"``: the same mask as the default, but the
    distances scale with the features (measured below).
  - ``"minmax"``: ``min(1 - A) = 0`` with any rule on the reverse map, so the "background" is
    every pixel but the peak.

  Fig. 6's description ("Lower θ_bg leaves more foreground attention on the negative
  counterpart") fits eq. 3's reverse form; with ``"map_min"`` a lower ``theta_bg`` leaves LESS
  on the negative. The default still takes Sec. 4's rule because it is the one under which eq. 4
  trains at all on unit maps. The mask is a hard indicator (no gradient through it); ``d`` is per
  image, ``sqrt(sum of squares)`` clamped at 1e-12 before the root so that identical maps
  (identity pretext labels) give a zero, finite gradient. The former ``caml.distance = "mse"``
  remedy is gone: with an empty background the negative is the zero map and the loss only
  pushed the maps up everywhere.
- ``pretext.head_input``: eq. 6 "employ a GAP layer at the end of the network". Default
  ``"weighted"``: the heads read ``F_w`` (ECA is a layer "inserted at the last convolution
  layer", Sec. 4, whose output continues into the network as in ECA-Net); ``"raw"`` reads
  ``F_x`` (the PsyNet heads' input).
- Fill of undefined regions: the paper fills them with reflection for scale and zeros for
  translation (Sec. 4.2); here on the normalized image (zero = the dataset mean colour, as PsyNet
  applies ``grid_sample`` to normalized tensors). ``T`` on maps uses the same fill as on images;
  ``T^-1`` on maps fills with zeros (the content is unknown there). ``pretext.mask_undefined``
  (default off: the paper compares whole maps) restricts ``d`` to pixels whose content exists in
  both images.
- Scale factors and translation amounts are not given in the paper. Defaults: scale magnifications
  (1, 1/1.3, 1/0.7), the PsyNet code's sampling-grid scales {1.3, 1.0, 0.7} that CAML's Table 7
  reproduces; translation 0.25 of the side (identity + 4 directions), a project choice.
- Several transforms: Table 7 trains each transform alone; Table 2's numbers use an "optimal
  combination" the paper does not spell out. ``pretext.mode = "separate"`` (default) gives every
  listed transform its own view (each with its own eq. 4 and eq. 6 terms, summed);
  ``"compose"`` applies all listed transforms to ONE view in the listed order (the PsyNet code's
  composition; each head classifies its own component) and inverts them in reverse order.
  The default ``transforms = ("rotation",)`` is the paper's base task (Tables 3-6) and its best
  single task on CUB (Table 7).
- ``E_x`` over several views: eq. 4 and eq. 6 terms are summed over views/heads (each pretext
  task brings its own loss; PsyNet sums its heads' cross-entropies), averaged over images.
- **PST is not implemented.** Table 7's last row is PsyNet's point symmetric transformation [2],
  "reproduced using official code"; CAML's text does not define it, and PsyNet's definition is
  not among the sources this project works from, so no PST pretext is offered rather than a
  guess. ``pretext.mode = "compose"`` over rotation, scale and translation is the nearest
  available setting, and it is NOT PST; Table 7's five other rows are all available.

Switches for the paper's ablations
----------------------------------

Table 3: ``cls_weight = 0`` (-L_cls; no pretext heads are built), ``caml.weight = 0`` (-L_caml;
with ``pretext.head_input = "raw"`` no loss reaches ECA then, so it is frozen),
``ptap.eca = false`` + ``ptap.k_ratio = 1.0`` (-A_PTAP: the channel-average "CAAM" map of [2]).
Table 4: ``caml.embedding``. Table 5: ``caml.pairs = "pos"`` (L2 between positive pairs only) /
``"neg"`` (``[m - d(anchor, negative)]_+`` only). Table 6: ``ptap.k_ratio`` (1.0 = average,
``<= 1/C`` = max) and ``ptap.select = "bottom"`` with ``k_ratio = 0.3`` (bottom-30%). Table 7 /
Fig. 6: ``pretext.transforms``, ``caml.theta_bg``.

Efficiency
----------

The original images and every transformed view are concatenated along the batch and go through
the backbone in ONE pass. PTAP's top-k mean takes whichever of the two selections is smaller:
the mean of the top ``k`` is ``(sum_all - sum_bottom(C - k)) / k``, and ``torch.topk`` with a
small ``k`` is much cheaper than with a large one or a full sort (BENCHMARKS.md, "CAML's step
cost"). Every view adds the
whole batch again to the backbone's work (x and T(x) both need maps): ``views_per_step = 1`` draws
ONE of several listed transforms per step (separate mode), and ``pretext.view_fraction < 1``
transforms only the first ``ceil(view_fraction * B)`` images of the batch (an efficiency knob,
not the paper's). With ``views_per_step``, heads of transforms not drawn this step join the graph
through a zero-weighted term, so DDP sees every parameter used. Under ``torch.compile`` each
drawn transform subset is its own graph (at most a handful).

What each knob costs against a CAM step is measured in BENCHMARKS.md ("CAML's step cost"): the
method's own operations are a few per cent of the step; the rest is the backbone on twice the
images, which the method needs (the maps of x and of T(x)).

The project's addition: the probe classifier
--------------------------------------------

CAML trains with no class labels. For Top-1/Top-5 Loc reporting, ``probe_classifier`` (default
on) adds a linear probe (GAP + linear) on the DETACHED backbone features of the original images,
trained with cross-entropy on the samples with ``label >= 0`` (term ``probe``; 0 when the batch is
unlabeled). It never influences the backbone, ECA, heads or maps; ``inference`` returns its logits
(None when off). This is not part of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsol_core.config_fields import ConfigError, MethodConfig, spec
from wsol_core.data.batch import Batch
from wsol_core.methods.base import Inference, WSOLMethod
from wsol_core.methods.components import no_autocast
from wsol_core.methods.pretext import apply_ops, build_transforms, invert_ops
from wsol_core.models.base import Backbone, init_new_layers
from wsol_core.models.head import CAMHead

TransformName = Literal["rotation", "scale", "translation", "hflip", "vflip"]
TRANSFORM_NAMES: tuple[str, ...] = ("rotation", "scale", "translation", "hflip", "vflip")

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class PTAPConfig:
    """Pixel-wise top-k attention pooling (Sec. 3.1, eq. 1-2)."""

    # k = round(k_ratio * C) channels per pixel, clamped to [1, C]; 1.0 = average pooling,
    # <= 1/C = max pooling. Table 6: top-70% is best.
    k_ratio: float = spec(0.7, gt=0.0, le=1.0, doc="fraction of channels averaged per pixel (eq. 2)")
    # "bottom" averages the k smallest values instead (Table 6's bottom-30% ablation).
    select: Literal["top", "bottom"] = "top"
    # Eq. 1's ECA channel attention; off: F_w = F_x.
    eca: bool = True
    # 0: ECA's adaptive size |log2(C)/gamma + b/gamma|_odd; otherwise an odd kernel size.
    eca_kernel: int = spec(0, ge=0, doc="Conv1D kernel size, 0 = adaptive (ECA-Net)")
    eca_gamma: float = spec(2.0, gt=0.0)
    eca_b: float = 1.0

    def validate(self, path: str) -> None:
        if self.eca_kernel != 0 and self.eca_kernel % 2 != 1:
            raise ConfigError(
                f"{path}.eca_kernel = {self.eca_kernel!r} must be 0 (adaptive) or an odd positive integer"
            )


@dataclass
class ScaleConfig:
    # Content magnification per class (< 1 shrinks: the border is filled by reflection; > 1
    # zooms in). 1.0 is the identity class. Default: PsyNet's grid scales 1.3 / 1.0 / 0.7.
    factors: tuple[float, ...] = spec((1.0, 1.0 / 1.3, 1.0 / 0.7), gt=0.0, le=4.0)

    def validate(self, path: str) -> None:
        if len(self.factors) < 2:
            raise ConfigError(f"{path}.factors = {list(self.factors)} needs at least 2 classes")
        if len(set(self.factors)) != len(self.factors):
            raise ConfigError(f"{path}.factors = {list(self.factors)} has repeated values (classes must differ)")


@dataclass
class TranslationConfig:
    # Classes: identity, right, left, down, up by ``shift`` of the image side (zero fill).
    shift: float = spec(0.25, gt=0.0, lt=1.0, doc="fraction of the side")


@dataclass
class PretextConfig:
    """The self-supervised pretext tasks (Sec. 3.2, eq. 6, Table 7)."""

    transforms: tuple[TransformName, ...] = ("rotation",)
    # "separate": one view per listed transform; "compose": one view with all of them applied.
    mode: Literal["separate", "compose"] = "separate"
    # separate mode: transforms drawn per step (0 = all listed ones).
    views_per_step: int = spec(0, ge=0)
    # Fraction of the batch that gets transformed views (1.0 = all, the paper).
    view_fraction: float = spec(1.0, gt=0.0, le=1.0)
    head_input: Literal["weighted", "raw"] = "weighted"
    mask_undefined: bool = False
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    translation: TranslationConfig = field(default_factory=TranslationConfig)

    def validate(self, path: str) -> None:
        if not self.transforms:
            raise ConfigError(f"{path}.transforms is empty; choose from {list(TRANSFORM_NAMES)}")
        if len(set(self.transforms)) != len(self.transforms):
            raise ConfigError(f"{path}.transforms = {list(self.transforms)} lists a transform twice")
        if self.views_per_step > len(self.transforms):
            raise ConfigError(
                f"{path}.views_per_step = {self.views_per_step} is more than the {len(self.transforms)} "
                f"listed transforms ({path}.transforms = {list(self.transforms)})"
            )
        if self.mode == "compose" and self.views_per_step not in (0, len(self.transforms)):
            raise ConfigError(
                f"{path}.views_per_step = {self.views_per_step} only applies to {path}.mode = 'separate' "
                "(compose mode always makes one view with every listed transform)"
            )


@dataclass
class ContrastiveMapConfig:
    """The contrastive attention map loss (eq. 3-4)."""

    weight: float = spec(1.0, ge=0.0, doc="eq. 5 weight of L_caml (0 = -L_caml ablation)")
    margin: float = spec(1.0, ge=0.0, doc="m of eq. 4")
    theta_bg: float = spec(2.3, gt=0.0, doc="ratio of eq. 3's background threshold")
    # The module docstring ("Ambiguities") gives every reading and the measurement behind the
    # defaults: unit-L2 maps and the scale-invariant rule of Sec. 4 keep the hinge alive.
    bg_rule: Literal["reverse_min", "map_min"] = "map_min"
    map_activation: Literal["l2", "sigmoid", "none", "minmax"] = "l2"
    pairs: Literal["both", "pos", "neg"] = "both"
    embedding: Literal["attention", "feature"] = "attention"


@dataclass
class CAMLConfig(MethodConfig):
    """CAML's settings; the module docstring explains every ambiguous choice."""

    TUNABLE: ClassVar[dict[str, str]] = {"margin": "caml.margin"}

    name: str = "caml"
    ptap: PTAPConfig = field(default_factory=PTAPConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    caml: ContrastiveMapConfig = field(default_factory=ContrastiveMapConfig)
    cls_weight: float = spec(1.0, ge=0.0, doc="eq. 5 weight of L_cls (0 = -L_cls ablation, no heads)")
    # The project's addition (not the paper's): a linear probe on detached features.
    probe_classifier: bool = True

    def validate(self, path: str) -> None:
        if self.cls_weight == 0 and self.caml.weight == 0:
            raise ConfigError(
                f"{path}.cls_weight and {path}.caml.weight are both 0; at least one term of eq. 5 must train the maps"
            )


# ---------------------------------------------------------------------------------------------
# PTAP (eq. 1-2)
# ---------------------------------------------------------------------------------------------


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA-Net's adaptive kernel size ``|log2(C)/gamma + b/gamma|_odd`` (used by eq. 1)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 == 1 else t + 1


class ECA(nn.Module):
    """Eq. 1: ``F_w = F_x (.) sigma(Conv1D(GAP(F_x)))`` (ECA-Net's module, no bias)."""

    def __init__(self, channels: int, kernel_size: int = 0, gamma: float = 2.0, b: float = 1.0) -> None:
        super().__init__()
        k = kernel_size or eca_kernel_size(channels, gamma, b)
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        init_new_layers([self.conv])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, h, w]`` -> (``F_w`` [B, C, h, w], channel weights [B, C])."""
        pooled = features.mean(dim=(2, 3))  # GAP, [B, C]
        weights = torch.sigmoid(self.conv(pooled.unsqueeze(1)).squeeze(1))
        return features * weights[:, :, None, None].to(features.dtype), weights


def ptap_k(channels: int, k_ratio: float) -> int:
    """The number of channels eq. 2 averages: ``round(k_ratio * C)`` clamped to [1, C]."""
    return min(channels, max(1, round(k_ratio * channels)))


def ptap(features: torch.Tensor, k: int, select: str = "top") -> torch.Tensor:
    """Eq. 2: per pixel, the mean of the ``k`` largest (``"top"``) or smallest (``"bottom"``)
    channel values of ``F_w``. ``[B, C, h, w]`` -> ``[B, h, w]`` float32.

    ``k = C`` is channel-average pooling and ``k = 1`` channel-max pooling (Sec. 3.1). The
    selection is done with ``torch.topk`` on whichever side is smaller: the top-``k`` sum equals
    the total minus the bottom-``(C - k)`` sum (a smaller ``topk`` is much cheaper than a large one
    or a full sort); gradients are 1/k on the selected channels and exactly 0 elsewhere. Sums are
    accumulated in float32 (bf16 inputs under autocast).
    """
    c = features.shape[1]
    if not 1 <= k <= c:
        raise ValueError(f"PTAP k = {k} must be in [1, {c}]")
    if select not in ("top", "bottom"):
        raise ValueError(f"select must be 'top' or 'bottom', got {select!r}")
    largest = select == "top"
    if k == c:
        return features.sum(dim=1, dtype=torch.float32) / c
    if k <= c - k:
        chosen = features.topk(k, dim=1, largest=largest, sorted=False).values
        return chosen.sum(dim=1, dtype=torch.float32) / k
    rest = features.topk(c - k, dim=1, largest=not largest, sorted=False).values
    total = features.sum(dim=1, dtype=torch.float32)
    return (total - rest.sum(dim=1, dtype=torch.float32)) / k


# ---------------------------------------------------------------------------------------------
# Eq. 3-4
# ---------------------------------------------------------------------------------------------


def activate_maps(maps: torch.Tensor, activation: str) -> torch.Tensor:
    """The map ``A`` that eq. 3-4 act on, from eq. 2's map (``caml.map_activation``; see the
    module docstring for why ``"sigmoid"`` is the default). ``[N, h, w]`` float32."""
    maps = maps.float()
    if activation == "l2":
        return unit_l2(maps)
    if activation == "sigmoid":
        return torch.sigmoid(maps)
    if activation == "none":
        return maps
    if activation == "minmax":
        low = maps.amin(dim=(-2, -1), keepdim=True)
        high = maps.amax(dim=(-2, -1), keepdim=True)
        return (maps - low) / (high - low).clamp_min(1e-6)
    raise ValueError(f"map_activation must be 'l2', 'sigmoid', 'none' or 'minmax', got {activation!r}")


def unit_l2(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||_2`` per sample over every non-batch element (``caml.map_activation = "l2"``):
    eq. 4's distances between unit maps lie in [0, 2], on the scale of the margin m = 1."""
    norm = x.float().flatten(1).norm(dim=1).clamp_min(1e-6)
    return x.float() / norm.view(-1, *([1] * (x.dim() - 1)))


def background_mask(maps: torch.Tensor, theta_bg: float, rule: str = "reverse_min") -> torch.Tensor:
    """Eq. 3's ``M_bg`` for ``[N, h, w]`` maps, float {0, 1}, no gradient.

    ``"reverse_min"`` (eq. 3): ``1[(1 - A) > theta_bg * min_pixels(1 - A)]`` per image.
    ``"map_min"`` (Sec. 4's wording): ``1[A < theta_bg * min_pixels(A)]`` per image.
    """
    maps = maps.detach().float()
    if rule == "reverse_min":
        reverse = 1.0 - maps
        threshold = theta_bg * reverse.amin(dim=(-2, -1), keepdim=True)
        return (reverse > threshold).float()
    if rule == "map_min":
        threshold = theta_bg * maps.amin(dim=(-2, -1), keepdim=True)
        return (maps < threshold).float()
    raise ValueError(f"bg_rule must be 'reverse_min' or 'map_min', got {rule!r}")


def l2_distance(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's ``d``: per-sample L2 norm of ``x - y`` over every non-batch element, float32 [N].

    ``weight`` (broadcastable, e.g. ``[N, 1, h, w]``) multiplies the squared differences
    (``pretext.mask_undefined``). The sum of squares is clamped at 1e-12 before the root, so
    identical inputs give d = 1e-6 and a zero (finite) gradient instead of NaN."""
    with no_autocast(x.device):
        sq = (x.float() - y.float()).square()
        if weight is not None:
            sq = sq * weight.float()
        return sq.flatten(1).sum(dim=1).clamp_min(1e-12).sqrt()


def triplet_hinge(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
    pairs: str = "both",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One bracket of eq. 4, per sample [N]: ``[d(a, p) - d(a, n) + m]_+``.

    ``pairs = "pos"``: ``d(a, p)`` only (Table 5, "w/o neg pairs", an L2 loss between positive
    pairs); ``"neg"``: ``[m - d(a, n)]_+`` only (Table 5, "w/o pos pairs")."""
    if pairs == "pos":
        return l2_distance(anchor, positive, weight)
    if pairs == "neg":
        return F.relu(margin - l2_distance(anchor, negative, weight))
    if pairs != "both":
        raise ValueError(f"pairs must be 'both', 'pos' or 'neg', got {pairs!r}")
    return F.relu(l2_distance(anchor, positive, weight) - l2_distance(anchor, negative, weight) + margin)


def caml_loss(
    a_ori: torch.Tensor,
    a_trans: torch.Tensor,
    a_trans2ori: torch.Tensor,
    a_ori2trans: torch.Tensor,
    *,
    margin: float = 1.0,
    theta_bg: float = 2.3,
    bg_rule: str = "map_min",
    pairs: str = "both",
) -> torch.Tensor:
    """Eq. 3-4 on ``[N, h, w]`` maps (already activated), averaged over the N images.

    The reference composition used by the tests; :meth:`CAML.forward` builds the same triplets
    (also for the ``"feature"`` embedding and with undefined-region weights)."""
    n_ori = a_ori * background_mask(a_ori, theta_bg, bg_rule)
    n_trans = a_trans * background_mask(a_trans, theta_bg, bg_rule)
    first = triplet_hinge(a_trans2ori, a_ori, n_ori, margin, pairs)
    second = triplet_hinge(a_ori2trans, a_trans, n_trans, margin, pairs)
    return (first + second).mean()


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class CAML(WSOLMethod):
    config_class = CAMLConfig
    cfg: CAMLConfig  # what config_class guarantees (checked in WSOLMethod.__init__)
    uses_labels = False

    def __init__(self, backbone: Backbone, num_classes: int, cfg: CAMLConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        channels = backbone.out_channels
        self.k = ptap_k(channels, cfg.ptap.k_ratio)
        self.eca = ECA(channels, cfg.ptap.eca_kernel, cfg.ptap.eca_gamma, cfg.ptap.eca_b) if cfg.ptap.eca else None
        self.transforms = build_transforms(cfg.pretext)
        self.heads = (
            nn.ModuleDict({name: CAMHead(channels, t.num_classes) for name, t in self.transforms.items()})
            if cfg.cls_weight > 0
            else None
        )
        self.probe = CAMHead(channels, num_classes) if cfg.probe_classifier and num_classes >= 1 else None
        if self.eca is not None and cfg.caml.weight == 0 and cfg.pretext.head_input == "raw":
            # No loss reaches ECA in this configuration: freeze it (it still shapes the maps).
            self.eca.requires_grad_(False)

    # -- pieces --------------------------------------------------------------------------------

    def attention(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1-2: (``F_w``, PTAP map ``[B, h, w]`` float32)."""
        weighted = self.eca(features)[0] if self.eca is not None else features
        return weighted, ptap(weighted, self.k, self.cfg.ptap.select)

    def _plan_views(self) -> list[list[str]]:
        """Transform names per view this step (Python-level; no tensor values involved)."""
        names = list(self.transforms)
        pre = self.cfg.pretext
        if pre.mode == "compose":
            return [names]
        if 0 < pre.views_per_step < len(names):
            order = torch.randperm(len(names)).tolist()  # CPU generator: no device sync
            return [[names[i]] for i in sorted(order[: pre.views_per_step])]
        return [[name] for name in names]

    # -- the interface -------------------------------------------------------------------------

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Training forward (Fig. 3): draw per-image pretext labels, build the transformed views,
        run originals + views through the backbone in one pass, PTAP maps (eq. 1-2), pretext
        logits (eq. 6) and the eq. 3-4 triplets. ``labels`` and ``progress`` are not used.

        Outputs: ``maps`` [B, h, w] (eq. 2, originals); ``pretext_logits_<t>`` /
        ``pretext_labels_<t>`` per drawn transform; ``caml_a1/p1/n1`` = (A_trans2ori, A_ori,
        A_ori2bg) and ``caml_a2/p2/n2`` = (A_ori2trans, A_trans, A_trans2bg), [V*m, C', h, w]
        stacked over views (``caml_w1/w2``: undefined-region weights); ``logits``: the probe's.
        """
        cfg = self.cfg
        b = images.shape[0]
        m = b if cfg.pretext.view_fraction >= 1.0 else max(1, math.ceil(cfg.pretext.view_fraction * b))
        device = images.device
        plan = self._plan_views()
        src = images[:m]
        views, view_ops = [], []
        for names in plan:
            ops = [
                (self.transforms[n], torch.randint(self.transforms[n].num_classes, (m,), device=device)) for n in names
            ]
            views.append(apply_ops(src, ops))
            view_ops.append(ops)
        channels_last = (
            images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        )
        batch = torch.cat([images, *views], dim=0)
        batch = batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        features = self.backbone(batch)  # ONE pass: originals + every view
        weighted, maps = self.attention(features)
        out: dict[str, torch.Tensor] = {"maps": maps[:b]}

        if self.heads is not None:  # eq. 6, one head per transform
            head_in = weighted if cfg.pretext.head_input == "weighted" else features
            logits: dict[str, list[torch.Tensor]] = {}
            targets: dict[str, list[torch.Tensor]] = {}
            for v, ops in enumerate(view_ops):
                chunk = head_in[b + v * m : b + (v + 1) * m]
                for transform, lab in ops:
                    logits.setdefault(transform.name, []).append(self.heads[transform.name](chunk))
                    targets.setdefault(transform.name, []).append(lab)
            for name, chunks in logits.items():
                out[f"pretext_logits_{name}"] = torch.cat(chunks)
                out[f"pretext_labels_{name}"] = torch.cat(targets[name])

        if cfg.caml.weight > 0:  # eq. 3-4 triplets, stacked over views
            act = activate_maps(maps, cfg.caml.map_activation)  # [N, h, w]
            if cfg.caml.embedding == "attention":
                emb = act.unsqueeze(1)  # [N, 1, h, w]
            else:  # Table 4: A (.) F_w (unit-normalized as a whole under "l2")
                emb = act.unsqueeze(1) * weighted.float()
                if cfg.caml.map_activation == "l2":
                    emb = unit_l2(emb)
            bg = background_mask(act, cfg.caml.theta_bg, cfg.caml.bg_rule).unsqueeze(1)  # eq. 3
            out["caml_bg_mask"] = bg[:b, 0]  # eq. 3's M_bg of the originals (logged, not a loss input)
            ori_emb, ori_bg = emb[:m], bg[:m]
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("a1", "p1", "n1", "a2", "p2", "n2", "w1", "w2")}
            for v, ops in enumerate(view_ops):
                sl = slice(b + v * m, b + (v + 1) * m)
                trans_emb, trans_bg = emb[sl], bg[sl]
                parts["a1"].append(invert_ops(trans_emb, ops))  # A_trans2ori
                parts["p1"].append(ori_emb)  # A_ori
                parts["n1"].append(ori_emb * ori_bg)  # A_ori2bg
                parts["a2"].append(apply_ops(ori_emb, ops))  # A_ori2trans
                parts["p2"].append(trans_emb)  # A_trans
                parts["n2"].append(trans_emb * trans_bg)  # A_trans2bg
                if cfg.pretext.mask_undefined:
                    ones = torch.ones_like(ori_bg)
                    # Pixels whose content exists in both images: in original coordinates the
                    # region T^-1 brings back; in transformed ones the region T fills from inside.
                    parts["w1"].append(invert_ops(apply_ops(ones, ops, "zeros"), ops))
                    parts["w2"].append(apply_ops(ones, ops, "zeros"))
            for key, values in parts.items():
                if values:
                    out[f"caml_{key}"] = torch.cat(values)

        if self.probe is not None:  # the project's probe: detached, never reaches the maps
            out["logits"] = self.probe(features[:b].detach())
        return out

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 3's background mask ``M_bg`` of the original images (the negatives' support)."""
        return {"caml_bg": outputs["caml_bg_mask"]} if "caml_bg_mask" in outputs else {}

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 5's terms, weighted: ``cls`` (eq. 6, summed over pretext heads), ``caml`` (eq. 4,
        mean over images, summed over views) and the project's ``probe`` (labelled samples only)."""
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        b = outputs["maps"].shape[0]
        m = b if cfg.pretext.view_fraction >= 1.0 else max(1, math.ceil(cfg.pretext.view_fraction * b))
        if self.heads is not None:  # eq. 6, summed over heads
            cls = outputs["maps"].new_zeros(())
            for name, head in self.heads.items():
                key = f"pretext_logits_{name}"
                if key in outputs:
                    cls = cls + F.cross_entropy(outputs[key].float(), outputs[f"pretext_labels_{name}"])
                else:  # not drawn this step: keep its parameters in the graph (DDP) at weight 0
                    cls = cls + 0.0 * sum(p.sum() for p in head.parameters())
            terms["cls"] = cfg.cls_weight * cls
        if cfg.caml.weight > 0:  # eq. 4: E_x of the two hinges, summed over views
            w1 = outputs.get("caml_w1")
            w2 = outputs.get("caml_w2")
            c = cfg.caml
            first = triplet_hinge(outputs["caml_a1"], outputs["caml_p1"], outputs["caml_n1"], c.margin, c.pairs, w1)
            second = triplet_hinge(outputs["caml_a2"], outputs["caml_p2"], outputs["caml_n2"], c.margin, c.pairs, w2)
            terms["caml"] = cfg.caml.weight * (first + second).sum() / m
        if self.probe is not None:  # the project's probe; 0 on an unlabeled batch
            labels = batch.labels.to(outputs["logits"].device)
            known = labels >= 0
            ce = F.cross_entropy(outputs["logits"].float(), labels.clamp_min(0), reduction="none")
            terms["probe"] = (ce * known).sum() / known.sum().clamp_min(1)
        return terms

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        """Sec. 3.3: the PTAP map of the original image (eq. 2), class-agnostic; the probe's
        logits (or None)."""
        features = self.backbone(images)
        _, maps = self.attention(features)
        logits = self.probe(features) if self.probe is not None else None
        return Inference(logits=logits, maps=maps)
