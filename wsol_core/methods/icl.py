"""ICL: Ki, Uh, Lee, Byun, "In-sample Contrastive Learning and Consistent Attention for Weakly
Supervised Object Localization", ACCV 2020.

Only the abstract of this paper is available to us. The design below follows the abstract's
four components and borrows every unstated mechanism from FMCG (Lee et al., BMVC 2021, same
group, ICL's successor; :mod:`wsol_core.methods.fmcg`), which the abstract's wording matches.
Equation numbers cited as "FMCG eq. n" are FMCG's; ICL's own equations are unknown to us.
Every choice that the abstract does not fix is a config option, documented here.

Architecture (an adversarial-erasing dual branch, shared weights, one pass over the
concatenation of both branches as in FMCG Sec. 3.1):

1. **Non-local attention instead of channel pooling** ("we use the non-local attention blocks to
   replace channel-pooled attention leading to enhanced attention maps considering the spatial
   similarity"). A pairwise non-local block (FMCG eq. 6-7, :class:`PairwiseNonLocal`) is
   inserted at the drop stage (``nl.at_drop``) and its output ``X' = X + h(v W)`` continues
   down the network (the block must sit in the forward path to be trained: a binary drop mask
   carries no gradient). A second block before the classifier (``nl.at_final``, "blocks" is
   plural) enhances the final maps that the contrastive loss and the consistency reference read.
   ``nl.enabled = False`` removes both (plain channel-pooled attention ``mean_c X``). What the
   attention map is (``nl.attention``):

   - ``"channel_mean"`` (default): ``mean_c X'``, the channel mean of the block's enhanced
     features. With ``h``'s BatchNorm zero-initialised (non-local practice) this IS plain
     channel pooling at step 0 and departs from it as ``h(v W)`` trains.
   - ``"affinity"``: the map carried through the block's own pairwise weights,
     ``A'_i = sum_j W_ij (mean_c X')_j`` (:func:`non_local_attention`), which differs from
     channel pooling from the first step.

   The abstract's wording fits ``"affinity"`` more literally, but measured on structured
   pictures (the synthetic creatures, tiny backbone, 3 initialisations; BENCHMARKS.md "ICL's
   non-local attention") it flattens the map: the max-relative drop ``A > 0.8 max A`` took
   21-26 % of the map instead of 1-1.4 %, the background drop ``A < 0.2 max A`` 0.3-1 % instead
   of 17-24 %, and the contrastive loss had all three of its masks on only 12-25 % of the images
   instead of 75-100 %: its negative vanished. Every threshold of the abstract's components is
   relative to the map's peak, so the default keeps the block's enhanced features and pools
   them, and ``"affinity"`` stays a switch.
2. **Most-discriminative drop** (as ADL/EIL): ``1[A > theta_drop * max(A)]`` (FMCG eq. 2). ICL
   predates FMCG's *region-level* and *scheduled* drop, which FMCG presents as its own
   improvements over pixel-level erasing with a fixed threshold, so by default ICL drops at the
   pixel level (``drop.kernel_size = 1``) with a fixed threshold (``drop.scheduled = False``);
   both FMCG refinements are available as options.
3. **Background drop** ("we propose to drop background regions in addition to the most
   discriminative region"): the erased branch also loses the low-attention pixels
   ``1[A < bg_drop.theta_bg * max(A)]``, so ``X_bar = X * (1 - M_high) * (1 - M_low)``. Reading:
   one erased branch with both drops (the abstract speaks of one "dropped version"); without
   the discriminative part AND without the background context, the erased branch can only
   classify from the remaining object parts, so its activation grows inside the object instead
   of leaking into the background. No region expansion is applied to the background mask (it
   would eat into the object). ``theta_bg`` is not in the abstract; 0.2 by default.
4. **Contrastive attention loss** ("promotes similarity between foreground and its dropped
   version, and dissimilarity between the dropped version and background"), in-sample: the
   foreground of the erased branch ``zb_fg`` is the anchor, the original branch's foreground
   ``z_fg`` the positive, the background ``z_bg`` of the original branch the negative:
   ``L_cal = max(|zb_fg - z_fg|_2 - |zb_fg - z_bg|_2 + m, 0)`` (one term of FMCG eq. 5; FMCG
   later symmetrised it and added the erased branch's background). Embeddings as in FMCG:
   foreground masks by thresholding the final channel-pooled attention (FMCG eq. 3, same
   ``threshold_mode`` options), masked average pooling (FMCG eq. 4), two 1x1 convs + ReLU to
   128-d, L2-normalized. The negative region (``cal.negative``): ``"bg_drop"``, the pixels that
   the background drop removed (so the dropped background "serves as the negative"), resized to
   the final map; ``"final"``, ``A_F < tau_bg`` on the final attention (FMCG eq. 3); ``"auto"``
   (default): ``"bg_drop"`` when the background drop is on, else ``"final"``.
5. **Foreground consistency loss** ("penalizes earlier layers producing noisy attention
   regarding the later layer as a reference"): for each stage in ``fcl.stages`` (default: the
   drop stage, where ICL computes its attention anyway), the channel-pooled attention of the
   original branch is compared with the final attention of the original branch, which is
   detached (the reference is not pulled towards the noisy early map). Both maps are normalized
   per image (``fcl.normalize``: divide by the max, default, or min-max) after the reference is
   resized (bilinear) to the earlier map's resolution -- compared at the earlier resolution so
   that its fine-grained noise is what gets penalized. Distance: mean absolute difference
   (``fcl.distance = "l1"``, default) or mean squared difference; averaged over stages.

Total loss: ``L = L_cls^orig + L_cls^erased + w_cal L_cal + w_fcl L_fcl`` (weights in
``method.weights``, 1 by default: the abstract gives none). Switches: ``nl.enabled``,
``bg_drop.enabled``, ``cal.enabled``, ``fcl.enabled``.

Inference: the abstract says nothing; ICL builds on ADL-style dropping, which is deactivated at
test time, so by default the map is the plain CAM of the original branch (through the
non-local blocks) for the GT / predicted class (``inference_map = "original"``). FMCG's
"drop at the last threshold and fuse the branches" path is available (``"max"``, ``"mean"``,
``"erased"``; both drops applied at ``theta_drop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from wsol_core.config_fields import ConfigError, MethodConfig, spec
from wsol_core.data.batch import Batch
from wsol_core.methods.components import (
    ContrastConfig,
    DropConfig,
    DualBranchMethod,
    InferenceMap,
    NonLocalConfig,
    PairwiseNonLocal,
    ProjectionHead,
    channel_attention,
    drop_mask,
    masked_mean,
    masked_pool,
    non_local_attention,
    normalize_map,
    resize_mask,
    resolve_stage,
    scheduled_theta,
    threshold_masks,
    triplet_term,
)
from wsol_core.models.base import Backbone
from wsol_core.models.head import CAMHead


@dataclass
class ICLDropConfig(DropConfig):
    """The most-discriminative drop: pixel-level (``kernel_size`` 1) at a fixed threshold by
    default; ``scheduled`` turns on FMCG's linear 1 -> theta_drop schedule."""

    kernel_size: int = spec(1, ge=1, odd=True)
    scheduled: bool = False


@dataclass
class BackgroundDropConfig:
    """Drop of the low-attention pixels ``A < theta_bg * max(A)`` in the erased branch."""

    enabled: bool = True
    theta_bg: float = spec(0.2, gt=0.0, lt=1.0)


@dataclass
class CALConfig(ContrastConfig):
    """Contrastive attention loss: masks, pooling, head and margin as FMCG's CG; ``negative`` picks
    the background region (see the module docstring)."""

    negative: Literal["auto", "bg_drop", "final"] = "auto"


@dataclass
class FCLConfig:
    """Foreground consistency loss. ``stages``: earlier stages compared with the final attention;
    empty means the drop stage."""

    enabled: bool = True
    stages: tuple[str, ...] = ()
    distance: Literal["l1", "l2"] = "l1"
    normalize: Literal["max", "minmax"] = "max"


@dataclass
class ICLNonLocalConfig(NonLocalConfig):
    """Non-local attention blocks: ``enabled`` is the master switch, ``at_drop`` / ``at_final``
    place them (the drop stage / before the classifier)."""

    at_drop: bool = True
    at_final: bool = True
    # "channel_mean": the channel mean of the block's output (default; at initialisation exactly
    # plain channel pooling); "affinity": the channel-pooled map carried through the block's
    # pairwise weights W. The module docstring gives the measurement behind the default.
    attention: Literal["channel_mean", "affinity"] = "channel_mean"


@dataclass
class ICLWeights:
    cls: float = spec(1.0, ge=0.0)
    cls_erased: float = spec(1.0, ge=0.0)
    cal: float = spec(1.0, ge=0.0)
    fcl: float = spec(1.0, ge=0.0)


@dataclass
class ICLConfig(MethodConfig):
    TUNABLE: ClassVar[dict[str, str]] = {
        "theta_drop": "drop.theta_drop",
        "S": "drop.kernel_size",
        "tau_fg": "cal.tau_fg",
        "tau_bg": "cal.tau_bg",
        "margin": "cal.margin",
    }
    SWITCHES: ClassVar[dict[str, str]] = {"bg_drop": "BG-drop", "nl": "NL", "cal": "CAL", "fcl": "FCL"}

    name: str = "icl"
    drop: ICLDropConfig = field(default_factory=ICLDropConfig)
    bg_drop: BackgroundDropConfig = field(default_factory=BackgroundDropConfig)
    cal: CALConfig = field(default_factory=CALConfig)
    fcl: FCLConfig = field(default_factory=FCLConfig)
    nl: ICLNonLocalConfig = field(default_factory=ICLNonLocalConfig)
    weights: ICLWeights = field(default_factory=ICLWeights)
    inference_map: InferenceMap = "original"

    def validate(self, path: str) -> None:
        if self.bg_drop.enabled and not self.bg_drop.theta_bg < self.drop.theta_drop:
            raise ConfigError(
                f"{path}.bg_drop.theta_bg = {self.bg_drop.theta_bg!r} must be smaller than "
                f"{path}.drop.theta_drop = {self.drop.theta_drop!r}: the background lies below the dropped peak"
            )
        if self.cal.enabled and self.cal.negative == "bg_drop" and not self.bg_drop.enabled:
            raise ConfigError(
                f"{path}.cal.negative = 'bg_drop' needs {path}.bg_drop.enabled = true; use 'final' or 'auto'"
            )


def background_mask(attention: torch.Tensor, theta_bg: float) -> torch.Tensor:
    """ICL's background drop: ``1[A < theta_bg * max(A)]`` per image, ``[B, 1, h, w]`` float
    (the mirror of FMCG eq. 2)."""
    a = attention.float()
    return (a < theta_bg * a.amax(dim=(2, 3), keepdim=True)).to(a.dtype)


def consistency_term(
    early: torch.Tensor,
    reference: torch.Tensor,
    normalize: Literal["max", "minmax"] = "max",
    distance: Literal["l1", "l2"] = "l1",
) -> torch.Tensor:
    """Foreground consistency between an earlier attention map ``[B, 1, h, w]`` and the final
    attention ``[B, 1, H, W]`` (the reference, detached, resized bilinearly to ``h x w``); both
    normalized per image. Scalar: mean over pixels and images of ``|e - r|`` or ``(e - r)^2``."""
    ref = reference.detach().float()
    if tuple(ref.shape[-2:]) != tuple(early.shape[-2:]):
        ref = F.interpolate(ref, size=early.shape[-2:], mode="bilinear", align_corners=False)
    diff = normalize_map(early, normalize) - normalize_map(ref, normalize)
    return diff.abs().mean() if distance == "l1" else diff.square().mean()


class ICL(DualBranchMethod):
    config_class = ICLConfig
    cfg: ICLConfig

    def __init__(self, backbone: Backbone, num_classes: int, cfg: ICLConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.stage = resolve_stage(backbone, cfg.drop.stage, "method.drop.stage")
        names = backbone.stage_names
        drop_index = names.index(self.stage)
        fcl_stages = tuple(cfg.fcl.stages) or (self.stage,)
        for s in fcl_stages:
            if s not in names or s == names[-1]:
                raise ConfigError(
                    f"method.fcl.stages = {list(cfg.fcl.stages)!r}: {s!r} is not an earlier stage of "
                    f"{type(backbone).__name__}; choose from {list(names[:-1])}"
                )
        ordered = sorted(set(fcl_stages), key=names.index)
        self.fcl_stages = tuple(ordered) if cfg.fcl.enabled else ()
        self._front_stops = [s for s in self.fcl_stages if names.index(s) < drop_index] + [self.stage]
        self._back_stops = [s for s in self.fcl_stages if names.index(s) > drop_index]

        nl = cfg.nl
        make = lambda c: PairwiseNonLocal(c, nl.reduction, nl.zero_init, nl.scaled)  # noqa: E731
        self.nl_drop = make(backbone.stage_channels(self.stage)) if nl.enabled and nl.at_drop else None
        self.nl_final = make(backbone.out_channels) if nl.enabled and nl.at_final else None
        self.projection = (
            ProjectionHead(backbone.out_channels, cfg.cal.hidden_dim, cfg.cal.embed_dim) if cfg.cal.enabled else None
        )
        self.head = CAMHead(backbone.out_channels, num_classes)
        negative = cfg.cal.negative
        self.negative = ("bg_drop" if cfg.bg_drop.enabled else "final") if negative == "auto" else negative

    # -- drops ---------------------------------------------------------------------------------

    def theta(self, progress: float) -> float:
        d = self.cfg.drop
        return scheduled_theta(progress, d.theta_drop, d.schedule_fraction) if d.scheduled else d.theta_drop

    def _inference_theta(self) -> float:
        return self.cfg.drop.theta_drop

    def _inference_map(self) -> InferenceMap:
        return self.cfg.inference_map

    def drop_masks(
        self, x: torch.Tensor, theta: float, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(most-discriminative, background) masks ``[B, 1, h, w]``, 1 = erased, from the
        non-local attention at the drop stage (``weights``: the block's ``W``; None = channel mean)."""
        attention = self.attention(x.detach(), weights.detach() if weights is not None else None)
        high = drop_mask(attention, theta, self.cfg.drop.kernel_size)
        low = (
            background_mask(attention, self.cfg.bg_drop.theta_bg)
            if self.cfg.bg_drop.enabled
            else torch.zeros_like(high)
        )
        return high, low

    # -- branches ------------------------------------------------------------------------------

    def _front(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        taps: dict[str, torch.Tensor] = {}
        x, prev = images, None
        for s in self._front_stops:
            x = self.backbone.forward_features(x, after=prev, until=s)
            prev = s
            taps[s] = x
        weights = None
        if self.nl_drop is not None:
            x, weights = self.nl_drop(x, return_weights=True)
            taps[self.stage] = x
        return x, taps, weights

    def _back(self, y: torch.Tensor, taps: dict[str, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        prev = self.stage
        for s in self._back_stops:
            y = self.backbone.forward_features(y, after=prev, until=s)
            prev = s
            taps[s] = y[:b]
        y = self.backbone.forward_features(y, after=prev)
        if self.nl_final is not None:
            return self.nl_final(y, return_weights=True)
        return y, None

    def _single(self, images: torch.Tensor) -> torch.Tensor:
        x, taps, _ = self._front(images)
        return self._back(x, taps, images.shape[0])[0]

    def attention(self, features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """The attention map ``[B, 1, h, w]`` at a stage: through the stage's non-local block
        (:func:`non_local_attention`) when there is one and ``nl.attention = "affinity"``, else
        the channel mean."""
        if weights is None or self.cfg.nl.attention == "channel_mean":
            return channel_attention(features)
        return non_local_attention(features, weights)

    def _dual(self, images: torch.Tensor, theta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = images.shape[0]
        x, taps, drop_weights = self._front(images)
        high, low = self.drop_masks(x, theta, drop_weights)
        erased = x * ((1.0 - high) * (1.0 - low)).to(x.dtype)
        features, final_weights = self._back(torch.cat([x, erased], dim=0), taps, b)
        extras = {"drop_mask": high, "bg_drop_mask": low}
        if final_weights is not None:
            extras["nl_weights_final"] = final_weights
        for s in self.fcl_stages:
            extras[f"attention_{s}"] = self.attention(taps[s], drop_weights if s == self.stage else None)
        return features, extras

    # -- contrastive attention loss ------------------------------------------------------------

    def embed(
        self, features: torch.Tensor, bg_drop_mask: torch.Tensor, weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``z`` ``[B, 3, D]``: (z_fg, z_bg, zb_fg) and ``z_valid`` ``[B]`` (all three masks
        non-empty); the masks threshold the final (non-local) attention of both branches."""
        cal = self.cfg.cal
        if self.projection is None:
            raise RuntimeError("ICL.embed needs the projection head, which exists only with method.cal.enabled = true")
        b = features.shape[0] // 2
        attention = self.attention(features.detach(), weights.detach() if weights is not None else None)
        fg, bg = threshold_masks(attention, cal.tau_fg, cal.tau_bg, cal.threshold_mode)
        negative = (
            resize_mask(bg_drop_mask, (features.shape[-2], features.shape[-1]))
            if self.negative == "bg_drop"
            else bg[:b]
        )
        orig = masked_pool(features[:b], torch.cat([fg[:b], negative], dim=1), cal.pooling)  # [B, 2, C]
        erased = masked_pool(features[b:], fg[b:], cal.pooling)  # [B, 1, C]
        pooled = torch.cat([orig, erased], dim=1)
        z = self.projection(pooled.flatten(0, 1)).view(b, 3, -1)
        masks = torch.cat([fg[:b], negative, fg[b:]], dim=1)
        return {"z": z, "z_valid": (masks.sum(dim=(2, 3)) > 0).all(dim=1), "cal_masks": masks}

    def cal_loss(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``max(|zb_fg - z_fg| - |zb_fg - z_bg| + m, 0)`` averaged over valid images."""
        return masked_mean(triplet_term(z[:, 2], z[:, 0], z[:, 1], self.cfg.cal.margin), valid)

    def fcl_loss(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over ``fcl.stages`` of :func:`consistency_term` against the final attention of the
        original branch."""
        weights = outputs.get("nl_weights_final")
        b = outputs["features"].shape[0]
        reference = self.attention(outputs["features"], weights[:b] if weights is not None else None)
        fcl = self.cfg.fcl
        terms = [
            consistency_term(outputs[f"attention_{s}"], reference, fcl.normalize, fcl.distance) for s in self.fcl_stages
        ]
        return torch.stack(terms).mean()

    # -- interface -----------------------------------------------------------------------------

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        features, extras = self._dual(images, self.theta(progress))
        outputs = self._split_logits(features)
        outputs.update(extras)
        if self.projection is not None:
            outputs.update(self.embed(features, extras["bg_drop_mask"], extras.get("nl_weights_final")))
        return outputs

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The two drops (on the drop stage's attention) and, with CAL, its foreground, negative
        and erased-branch foreground masks (on the final attention)."""
        masks = {"drop": outputs["drop_mask"][:, 0], "bg_drop": outputs["bg_drop_mask"][:, 0]}
        if "cal_masks" in outputs:
            cal = outputs["cal_masks"]
            masks.update(cal_fg=cal[:, 0], cal_negative=cal[:, 1], cal_fg_erased=cal[:, 2])
        return masks

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """``cls``, ``cls_erased``, ``cal`` (contrastive attention) and ``fcl`` (foreground
        consistency) when on; weighted."""
        w = self.cfg.weights
        terms = self._classification_losses(outputs, batch, w.cls, w.cls_erased)
        if self.projection is not None:
            terms["cal"] = w.cal * self.cal_loss(outputs["z"], outputs["z_valid"])
        if self.fcl_stages:
            terms["fcl"] = w.fcl * self.fcl_loss(outputs)
        return terms
