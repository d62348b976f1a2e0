"""Building blocks shared by FMCG and ICL (two papers of the same group; FMCG is ICL's successor).

- Lee et al., "Foreground Mining via Contrastive Guidance for Weakly Supervised Object
  Localization" (FMCG, BMVC 2021): scheduled region drop (eq. 2 and the linear schedule of
  Sec. 3.2), foreground/background masks (eq. 3), masked features (eq. 4), the projection head
  and the contrastive guidance terms (eq. 5, Table 4's variants), the pairwise non-local block
  (eq. 6-7).
- Ki et al., "In-sample Contrastive Learning and Consistent Attention for WSOL" (ICL, ACCV 2020):
  the same drop / contrast / non-local machinery (see :mod:`wsol_core.methods.icl`).

Everything that both method files need lives here, so neither copies the other:

=================================  ===========================================================
:func:`channel_attention`          ``A = mean_c X`` in float32 (Sec. 3.2 "channel-wise pooling")
:func:`scheduled_theta`            theta_d going linearly from 1 to theta_drop (Sec. 3.2)
:func:`drop_mask`                  eq. 2 + the S x S region expansion (Sec. 3.2)
:func:`threshold_masks`            eq. 3 with the three readings of the thresholds
:func:`masked_pool`                eq. 4 followed by pooling to one vector per mask
:class:`ProjectionHead`            two 1x1 convs with ReLU, 128-d, L2-normalized (Sec. 3.3)
:func:`triplet_term`               one ``max[...]`` of eq. 5
:func:`info_nce_term`              the InfoNCE replacement of Table 4
:func:`pairwise_weights`           eq. 6 (whitened dot product + softmax)
:class:`PairwiseNonLocal`          eq. 7 (``F' = F + h(v W)``, h = 1x1 conv + BN)
:func:`combine_maps`               the inference-time fusion of the two branches' CAMs
:class:`DualBranchMethod`          shared skeleton: one pass over the branch concatenation,
                                   classification losses, inference path
=================================  ===========================================================

Numerics: attention maps, thresholds, pooled vectors, embeddings and pairwise similarities are
computed in float32 even under ``torch.autocast(..., dtype=torch.bfloat16)``; nothing here calls
``.item()`` or branches on tensor values, so the blocks trace under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsol_core.config_fields import ConfigError, spec
from wsol_core.data.batch import Batch
from wsol_core.methods.base import Inference, WSOLMethod, select_classes
from wsol_core.models.base import Backbone, init_new_layers
from wsol_core.models.head import CAMHead

ThresholdMode = Literal["max", "mean", "minmax"]
InferenceMap = Literal["max", "mean", "erased", "original"]
_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Config pieces shared by both methods
# ---------------------------------------------------------------------------------------------


@dataclass
class DropConfig:
    """Where and how the most discriminative region is erased (FMCG Sec. 3.2, eq. 2).

    ``stage``: the backbone stage after which the feature map is erased; ``""`` is the
    backbone's ``default_drop_stage`` (after conv4_3 for VGG16, FMCG Table 2's best; ``layer3``
    for ResNet50, ``mixed5`` for InceptionV3, ``block3`` for the tiny CNN).
    ``theta_drop``: the (last) drop threshold theta_d of eq. 2, relative to the per-image max.
    ``kernel_size``: S, the side of the square region each dropped pixel grows to (odd).
    ``schedule_fraction``: the fraction of training over which theta_d goes from 1 to
    ``theta_drop``; afterwards it stays. FMCG ramps "at the start of the training" (Sec. 3.2):
    the default 0.3 is the protocol's first learning-rate phase (15 of 50 CUB epochs, 3 of 10
    ImageNet epochs); 1.0 spreads the ramp over the whole run.
    """

    stage: str = ""
    theta_drop: float = spec(0.8, gt=0.0, le=1.0)
    kernel_size: int = spec(3, ge=1, odd=True)
    schedule_fraction: float = spec(0.3, gt=0.0, le=1.0, doc="warm-up share of training for the theta_d ramp")


@dataclass
class ContrastConfig:
    """Foreground/background masks (eq. 3), pooling (eq. 4) and the projection head (Sec. 3.3).

    ``threshold_mode`` decides what ``tau_fg`` / ``tau_bg`` scale (see :func:`threshold_masks`):
    ``"max"``: ``A > tau * max(A)`` as in eq. 2 (this shared default is ICL's; FMCG's own
    config defaults to ``"mean"``), ``"mean"``: ``A > tau * mean(A)``, ``"minmax"``: the min-max
    normalized map against ``tau`` directly. ``pooling``: ``"masked_mean"`` averages over the mask's pixels only,
    ``"gap"`` is global average pooling of ``F * M`` (divides by all ``h*w`` pixels).
    ``hidden_dim`` 0 means the input channel count.
    """

    enabled: bool = True
    tau_fg: float = spec(0.9, gt=0.0)
    tau_bg: float = spec(0.8, gt=0.0)
    threshold_mode: ThresholdMode = "max"
    margin: float = spec(1.0, ge=0.0)
    embed_dim: int = spec(128, ge=1)
    hidden_dim: int = spec(0, ge=0)
    pooling: Literal["masked_mean", "gap"] = "masked_mean"

    def validate(self, path: str) -> None:
        if not self.tau_bg < self.tau_fg:
            raise ConfigError(
                f"{path}.tau_bg = {self.tau_bg!r} must be smaller than {path}.tau_fg = {self.tau_fg!r} "
                "(eq. 3: the background lies below the foreground threshold)"
            )
        if self.threshold_mode in ("max", "minmax") and self.tau_fg >= 1.0:
            raise ConfigError(
                f"{path}.tau_fg = {self.tau_fg!r} must be < 1 with {path}.threshold_mode = "
                f"{self.threshold_mode!r}: no pixel exceeds the map's maximum, the foreground would be empty"
            )


@dataclass
class NonLocalConfig:
    """The pairwise non-local block (FMCG eq. 6-7).

    ``reduction``: C' = C // reduction (the paper's C' is not given; 2 is the non-local default).
    ``zero_init``: BatchNorm gamma of h starts at 0, so the block starts as the identity and
    the pretrained features pass unchanged at step 0 (Wang et al.'s non-local practice; the
    paper does not say). ``scaled``: divide the whitened dot product by sqrt(C') (not in eq. 6,
    so off by default; it tames softmax saturation with wide features).
    """

    enabled: bool = True
    reduction: int = spec(2, ge=1)
    zero_init: bool = True
    scaled: bool = False


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region computed in the inputs' dtype (float32 here) even inside an autocast block."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def resolve_stage(backbone: Backbone, stage: str, field: str) -> str:
    """``""`` -> the backbone's default drop stage; an unknown name is a :class:`ConfigError`."""
    stage = stage or backbone.default_drop_stage
    if stage not in backbone.stage_names:
        raise ConfigError(
            f"{field} = {stage!r} is not a stage of {type(backbone).__name__}; stages are {list(backbone.stage_names)}"
        )
    return stage


def channel_attention(features: torch.Tensor) -> torch.Tensor:
    """``A = (1/C) sum_c X_c``: the channel-wise pooled attention map (FMCG Sec. 3.2), ``[B, 1, h, w]``
    in float32."""
    return features.float().mean(dim=1, keepdim=True)


def normalize_map(attention: torch.Tensor, mode: Literal["max", "minmax"]) -> torch.Tensor:
    """Per-image normalization of ``[B, 1, h, w]`` maps: ``A / max(A)`` or ``(A - min) / (max - min)``."""
    a = attention.float()
    peak = a.amax(dim=(2, 3), keepdim=True)
    if mode == "max":
        return a / peak.clamp_min(_EPS)
    low = a.amin(dim=(2, 3), keepdim=True)
    return (a - low) / (peak - low).clamp_min(_EPS)


def scheduled_theta(progress: float, theta_drop: float, schedule_fraction: float = 1.0) -> float:
    """FMCG Sec. 3.2: theta_d decreases linearly from 1 to ``theta_drop``.

    ``progress`` in [0, 1] is the fraction of training done; theta_d reaches ``theta_drop`` at
    ``progress = schedule_fraction`` and stays there. Plain Python on a Python float: no tensor.
    """
    t = min(max(float(progress), 0.0) / schedule_fraction, 1.0)
    return 1.0 - (1.0 - theta_drop) * t


def drop_mask(attention: torch.Tensor, theta: float | torch.Tensor, kernel_size: int = 1) -> torch.Tensor:
    """FMCG eq. 2 and the region expansion of Sec. 3.2; ``1`` marks an erased pixel.

    ``M_pix = 1[A > max(A) * theta]`` with the max per image, then max pooling with an
    ``S x S`` kernel (stride 1, padding ``S // 2``) grows every dropped pixel into an ``S x S``
    region. ``S = 1`` is pixel-level erasing (ADL/EIL). The paper's ``M`` that multiplies
    ``X`` is the complement ``1 - drop_mask`` (the keep mask): the erased branch sees
    ``X * (1 - drop_mask)``. At ``theta = 1`` nothing is dropped (no pixel exceeds the max).
    """
    a = attention.float()
    peak = a.amax(dim=(2, 3), keepdim=True)
    pix = (a > peak * theta).to(a.dtype)
    if kernel_size > 1:
        pix = F.max_pool2d(pix, kernel_size, stride=1, padding=kernel_size // 2)
    return pix


def threshold_masks(
    attention: torch.Tensor, tau_fg: float, tau_bg: float, mode: ThresholdMode = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FMCG eq. 3: ``M_fg = 1[A_F > t_fg]``, ``M_bg = 1[A_F < t_bg]`` as float ``[B, 1, h, w]``.

    The paper: "thresholding the average intensity of channel-wise pooled attention map A_F as
    in Section 3.2". Three readings of what the thresholds are:

    - ``"mean"``: ``t = tau * mean(A_F)``, the map's average intensity (FMCG's default, chosen
      by the text and a measurement: see :mod:`wsol_core.methods.fmcg`);
    - ``"max"``: ``t = tau * max(A_F)`` per image, eq. 2's rule ("as in Section 3.2"), with
      "average intensity" naming A_F itself (channel-wise *average* pooling); ICL's default;
    - ``"minmax"``: A_F min-max normalized per image, compared with tau directly.
    """
    a = attention.float()
    if mode == "minmax":
        a = normalize_map(a, "minmax")
        ref = torch.ones_like(a[:, :, :1, :1])
    elif mode == "mean":
        ref = a.mean(dim=(2, 3), keepdim=True)
    else:
        ref = a.amax(dim=(2, 3), keepdim=True)
    fg = (a > tau_fg * ref).to(a.dtype)
    bg = (a < tau_bg * ref).to(a.dtype)
    return fg, bg


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A binary ``[B, 1, h, w]`` mask at another resolution: bilinear (area-like when halving)
    then ``>= 0.5``; unchanged when the size already matches."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return (F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False) >= 0.5).float()


def masked_pool(
    features: torch.Tensor, masks: torch.Tensor, mode: Literal["masked_mean", "gap"] = "masked_mean"
) -> torch.Tensor:
    """FMCG eq. 4 (``F_fg = F * M_fg``, ``F_bg = F * M_bg``) pooled to one vector per mask.

    ``features`` ``[B, C, h, w]``, ``masks`` ``[B, K, h, w]`` -> ``[B, K, C]`` float32.
    The paper does not say how the masked map becomes the vector the head projects:
    ``"masked_mean"`` (default) averages over the mask's pixels, so the vector does not shrink
    with the region's area (a small foreground would otherwise look like a weak one);
    ``"gap"`` is plain global average pooling of ``F * M``. An empty mask gives a zero vector
    (callers exclude such images from the loss).
    """
    m = masks.float()
    with no_autocast(features.device):
        total = torch.einsum("bchw,bkhw->bkc", features.float(), m)
    if mode == "gap":
        return total / float(m.shape[-2] * m.shape[-1])
    return total / m.sum(dim=(2, 3)).clamp_min(1.0).unsqueeze(-1)


class ProjectionHead(nn.Module):
    """FMCG Sec. 3.3: "two 1x1 convolution layers with ReLU activation", 128-d, L2-normalized.

    Applied to the pooled vectors (as ``[N, C, 1, 1]`` maps, where a 1x1 conv is a linear
    layer), one call for all vectors of both branches.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 0, embed_dim: int = 128) -> None:
        super().__init__()
        hidden = hidden_dim or in_channels
        self.conv1 = nn.Conv2d(in_channels, hidden, kernel_size=1)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(hidden, embed_dim, kernel_size=1)
        init_new_layers(self)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` -> unit-norm ``[N, embed_dim]`` float32."""
        x = vectors.to(self.conv1.weight.dtype)[:, :, None, None]
        z = self.conv2(self.relu(self.conv1(x))).flatten(1)
        return F.normalize(z.float(), dim=1)


# ---------------------------------------------------------------------------------------------
# Contrastive terms
# ---------------------------------------------------------------------------------------------


def triplet_term(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """One ``max[...]`` of FMCG eq. 5, per row: ``max(||a - p||_2 - ||a - n||_2 + m, 0)``."""
    d_pos = torch.linalg.vector_norm(anchor.float() - positive.float(), dim=-1)
    d_neg = torch.linalg.vector_norm(anchor.float() - negative.float(), dim=-1)
    return F.relu(d_pos - d_neg + margin)


def info_nce_term(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE (van den Oord et al.; FMCG Table 4 "w InfoNCE"), per row.

    ``-log( exp(a.p / t) / (exp(a.p / t) + sum_k exp(a.n_k / t)) )`` with unit vectors
    ``anchor``/``positive`` ``[N, D]`` and ``negatives`` ``[N, K, D]``.
    """
    with no_autocast(anchor.device):
        a = anchor.float()
        pos = (a * positive.float()).sum(dim=-1, keepdim=True)
        neg = torch.einsum("nd,nkd->nk", a, negatives.float())
        logits = torch.cat([pos, neg], dim=1) / temperature
    return -torch.log_softmax(logits, dim=1)[:, 0]


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over rows where ``valid`` (0 when none is): images whose foreground or
    background mask is empty have no defined embedding and are left out of the contrastive loss."""
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)


# ---------------------------------------------------------------------------------------------
# Pairwise non-local block
# ---------------------------------------------------------------------------------------------


def pairwise_weights(query: torch.Tensor, key: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """FMCG eq. 6: ``W_ij = softmax_j((q_i - mu_q)^T (k_j - mu_k))`` (Yin et al.'s whitened pairwise term).

    ``query``/``key`` ``[B, C', N]`` (N = h*w positions) -> ``[B, N, N]`` float32, rows sum to 1.
    ``mu`` is the spatial mean per channel, so a per-channel constant added to q or k cancels.
    Centering, the product and the softmax run in float32: the logits are large and bf16's
    8-bit mantissa would distort the softmax.
    """
    with no_autocast(query.device):
        q = query.float()
        k = key.float()
        q = q - q.mean(dim=2, keepdim=True)
        k = k - k.mean(dim=2, keepdim=True)
        logits = torch.bmm(q.transpose(1, 2), k)
        if scale != 1.0:
            logits = logits * scale
        return torch.softmax(logits, dim=-1)


class PairwiseNonLocal(nn.Module):
    """FMCG eq. 7: ``F' = F + h(v W)``, ``h`` = 1x1 conv + BatchNorm, q/k/v by 1x1 convs to C'."""

    def __init__(self, channels: int, reduction: int = 2, zero_init: bool = True, scaled: bool = False) -> None:
        super().__init__()
        inner = max(channels // reduction, 1)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, inner, kernel_size=1)
        self.out = nn.Conv2d(inner, channels, kernel_size=1, bias=False)  # BN follows: bias redundant
        self.bn = nn.BatchNorm2d(channels)
        init_new_layers(self)
        if zero_init:
            nn.init.zeros_(self.bn.weight)
        self.scale = inner**-0.5 if scaled else 1.0

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        """``F' = F + h(v W)``; with ``return_weights`` also eq. 6's ``W`` ``[B, N, N]``."""
        b, _, h, w = x.shape
        q = self.query(x).flatten(2)
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)
        weights = pairwise_weights(q, k, self.scale)  # [B, N_i, N_j]
        # (v W)_i = sum_j W_ij v_j  ->  v @ W^T
        y = torch.bmm(v, weights.to(v.dtype).transpose(1, 2)).reshape(b, -1, h, w)
        out = x + self.bn(self.out(y))
        return (out, weights) if return_weights else out


def non_local_attention(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The channel-pooled map carried through a non-local block's pairwise weights:
    ``A'_i = sum_j W_ij A_j`` with ``A = mean_c F`` (ICL's "non-local attention ... to replace
    channel-pooled attention ... considering the spatial similarity"). ``features``
    ``[B, C, h, w]``, ``weights`` ``[B, hw, hw]`` (rows sum to 1) -> ``[B, 1, h, w]`` float32."""
    b, _, h, w = features.shape
    a = channel_attention(features).reshape(b, h * w, 1)
    with no_autocast(features.device):
        return torch.bmm(weights.float(), a).reshape(b, 1, h, w)


# ---------------------------------------------------------------------------------------------
# Inference fusion and the dual-branch skeleton
# ---------------------------------------------------------------------------------------------


def combine_maps(original: torch.Tensor, erased: torch.Tensor | None, mode: InferenceMap) -> torch.Tensor:
    """The localization map from the two branches' CAMs (same classifier, same scale).

    ``"max"``: element-wise max (ACoL's fusion of the discriminative and complementary maps),
    ``"mean"``: their average, ``"erased"``: the erased branch alone, ``"original"``: the
    original branch alone (no drop at inference, as ADL deactivates its drop at test time).
    """
    if mode == "original" or erased is None:
        return original
    if mode == "erased":
        return erased
    if mode == "mean":
        return 0.5 * (original + erased)
    return torch.maximum(original, erased)


class DualBranchMethod(WSOLMethod):
    """Skeleton of an adversarial-erasing method with weight-shared branches (FMCG Sec. 3.1).

    Subclasses implement :meth:`_dual` (``[2B, C, h, w]`` final features, original branch first,
    one pass over the concatenation of ``X`` and the erased ``X_bar``; plus method-specific
    extras) and :meth:`_single` (the original branch alone). Their configs carry
    ``inference_map`` (:meth:`_inference_map`) and the drop threshold used at inference
    (:meth:`_inference_theta`).
    """

    head: CAMHead

    def _dual(self, images: torch.Tensor, theta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _single(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _inference_theta(self) -> float:
        raise NotImplementedError

    def _inference_map(self) -> InferenceMap:
        """The config's ``inference_map``."""
        raise NotImplementedError

    def _split_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        b = features.shape[0] // 2
        logits = self.head(features)
        return {
            "logits": logits[:b],
            "logits_erased": logits[b:],
            "features": features[:b],
            "features_erased": features[b:],
        }

    @staticmethod
    def _classification_losses(
        outputs: dict[str, torch.Tensor], batch: Batch, w_orig: float, w_erased: float
    ) -> dict[str, torch.Tensor]:
        """The two cross-entropy terms of FMCG eq. 1: ``L_cls^orig`` and ``L_cls^erased``."""
        return {
            "cls": w_orig * F.cross_entropy(outputs["logits"].float(), batch.labels),
            "cls_erased": w_erased * F.cross_entropy(outputs["logits_erased"].float(), batch.labels),
        }

    @torch.no_grad()
    def inference_variants(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ``erased``, ``original`` and ``max`` maps from ONE dual pass at the inference
        threshold (every layer after the drop is per-sample in eval mode, so the original half
        of the pass is the plain CAM), for the GT (or predicted) class of the original branch."""
        features, _ = self._dual(images, self._inference_theta())
        b = images.shape[0]
        classes = select_classes(self.head(features[:b]), labels)
        both = self.head.class_maps(features, torch.cat([classes, classes])).float()
        return {mode: combine_maps(both[:b], both[b:], mode) for mode in ("erased", "original", "max")}

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        """Logits of the original branch; the map of ``cfg.inference_map`` (see :func:`combine_maps`)
        for the GT class (or the predicted one when ``labels`` is None)."""
        mode = self._inference_map()
        if mode == "original":
            features = self._single(images)
            logits = self.head(features)
            return Inference(logits=logits, maps=self.head.class_maps(features, select_classes(logits, labels)).float())
        features, _ = self._dual(images, self._inference_theta())
        b = images.shape[0]
        logits = self.head(features[:b])
        classes = select_classes(logits, labels)
        both = self.head.class_maps(features, torch.cat([classes, classes]))
        return Inference(logits=logits, maps=combine_maps(both[:b].float(), both[b:].float(), mode))
