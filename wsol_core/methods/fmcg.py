"""FMCG: Lee, Ki, Mun, Kho, Byun, "Foreground Mining via Contrastive Guidance for Weakly
Supervised Object Localization", BMVC 2021.

A dual-branch adversarial-erasing classifier (Sec. 3.1, Fig. 2):

1. **Scheduled region drop (SRD, Sec. 3.2, eq. 2).** After the drop stage (``srd.stage``, by
   default after conv4_3 for VGG16, Table 2) the attention ``A = mean_c X`` is thresholded at
   ``max(A) * theta_d`` per image, each dropped pixel grows to an ``S x S`` region (max pooling,
   stride 1, padding S // 2) and the erased map is ``X_bar = X * (1 - region mask)``. The
   paper's ``M`` that multiplies ``X`` is this keep mask (after expansion): the most
   discriminative regions are the ones erased. The schedule: "we reduce the discrepancy between
   a dual-branch at the start of the training by decreasing the drop threshold linearly from 1
   to θ_d" (Sec. 3.2). theta_d goes linearly from 1 to ``theta_drop`` over the first
   ``srd.schedule_fraction`` of training (``progress`` from the loop) and then stays. The
   default 0.3 is a warm-up over the protocol's first learning-rate phase (15 of 50 CUB epochs,
   3 of 10 ImageNet epochs), so theta_d reaches its value while the rate is still at its base;
   ``1.0`` spreads the ramp over the whole run, which under the protocol's step decay holds
   theta_d >= 0.94 (CUB) for the whole first phase and reaches ``theta_drop`` only at 1/1000 of
   the base rate. BENCHMARKS.md ("FMCG: eq. 3 and the SRD ramp") measures both.
   ``X`` and ``X_bar`` run through the remaining layers with shared weights in ONE pass over
   their concatenation along the batch (so BatchNorm layers after the drop stage, e.g. ResNet's
   layer4, see batch statistics of both branches together).
2. **Pairwise non-local block (PNL, Sec. 3.4, eq. 6-7)** on the final feature maps of both
   branches, "inserted before the classifier" (Sec. 4.1): ``F' = F + h(v W)``, W the softmax
   of the whitened dot product of q and k (C' = C / ``pnl.reduction``), h = 1x1 conv + BN,
   BN gamma zero-initialized by default (the block starts as the identity; the paper is silent).
3. **Contrastive guidance (CG, Sec. 3.3, eq. 3-5)** on ``F'`` and ``F_bar'``: foreground /
   background masks from the channel-pooled final attention ``A_F`` (eq. 3), masked features
   (eq. 4) pooled to vectors (masked average pooling by default), projected by two 1x1 convs
   with ReLU to 128-d and L2-normalized, then eq. 5:
   ``max(|z_fg - zb_fg| - |z_fg - z_bg| + m, 0) + max(|zb_fg - z_fg| - |zb_fg - zb_bg| + m, 0)``,
   averaged over the images whose four masks are non-empty. ``cg.variant`` gives Table 4's
   alternatives: ``"infonce"`` (InfoNCE with the same positives and both in-sample
   backgrounds as the negatives, temperature ``cg.temperature``) and ``"orig_bg"`` (Ours-dagger:
   only the original branch's background ``z_bg`` is a negative, in both terms). The margin m
   is not in the main text (supplementary); 1.0 by default (unit vectors: distances in [0, 2]).

   **What tau scales in eq. 3** (``cg.threshold_mode``). Sec. 3.3: "We generate the foreground
   and background masks (M_fg, M_bg) by thresholding the average intensity of channel-wise
   pooled attention map A_F as in Section 3.2". Default ``"mean"``: ``A_F > tau_fg *
   mean(A_F)`` and ``A_F < tau_bg * mean(A_F)``, the "average intensity" the sentence names.
   ``"max"`` reads "as in Section 3.2" as eq. 2's ``tau * max(A_F)``; ``"minmax"`` compares
   the min-max normalized map with tau. Measured (synthetic benchmark, tiny backbone from
   scratch, 3 epochs, 3 seeds, test split; BENCHMARKS.md "FMCG: eq. 3 and the SRD ramp"): with
   ``"max"`` the foreground mask is 1.3 % of the map (2.5 of 196 cells) and the background
   98 %, a fifth of which lies inside the GT box, i.e. nearly the whole object is a negative;
   with ``"mean"`` the foreground is 29 % of the map (half of it inside the box) and the
   background 69 % (9 % inside the box). MaxBoxAccV2 did not separate the two beyond the seed
   spread (last epoch 38.70 ± 4.27 mean vs 42.07 ± 2.71 max; best-val checkpoint 59.00 ± 3.02
   vs 61.74 ± 2.82), so the text and the masks decide.
4. **Loss (eq. 1):** ``L = L_cls^orig + L_cls^erased + L_cg``; each term has a weight in
   ``method.weights`` (all 1 as in eq. 1; ``weights.cg`` is the lambda of a weighted variant).

Switches for Table 1's ablations: ``srd.enabled``, ``cg.enabled``, ``pnl.enabled``. With SRD off
the paper "use[s] pixel-level erasing when SRD is not applied": the erased branch stays, but
the drop is pixel-level (S = 1, no region expansion) at a FIXED threshold ``theta_drop`` (no
schedule) -- ADL/EIL-style erasing. With CG off there is no projection head and no ``cg`` term;
with PNL off the final features go straight to the classifier and CG.

**Inference.** Sec. 4.1: "For inference, we only utilize the scheduled region drop with its
last drop threshold to extract the complementary region, as in [3]. Note that we follow the [3]
for generating the class activation map of the target objects." The paper's [3] is Bae, Noh and
Kim, "Rethinking class activation mapping for weakly supervised object localization" (ECCV
2020), not ADL. The text says SRD is applied at test time at ``theta_drop`` (region-level, or
pixel-level when SRD is off), but not which branch's CAM is the localization map, so
``inference_map`` is a choice made on val, not a reading of the text:

- ``"erased"`` (default): the CAM of the erased feature, the "complementary region" the
  sentence names;
- ``"max"``: the element-wise max of the two branches' CAMs (ACoL's fusion); ``"mean"``;
- ``"original"``: the plain CAM, no drop at test time.

Evaluation logs the val MaxBoxAccV2 of ``erased``, ``original`` and ``max`` side by side
(``val/maxboxacc_v2_map_<name>``) so that the choice can be checked on the user's own data. On
the synthetic benchmark's val split ``"erased"`` scored 40.26 against 35.67 for ``"max"`` and
34.63 for ``"original"`` over the ablation's models (BENCHMARKS.md, "FMCG's inference map").
Fine-tuned from the pretrained proxy trunk (BENCHMARKS.md, "The fine-tuned ablation"), CAM's own
training scored with the erased map reaches 46.9 on test against CAM's 38.4 and full FMCG's 49.4
(seeds 0-1): on that benchmark most of FMCG's margin over CAM is this inference.
Logits are always the original branch's. CAMs are the classifier weights of the class applied to
the final (PNL-enhanced) feature map (Zhou et al.).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from wsol_core.config_fields import MethodConfig, spec
from wsol_core.data.batch import Batch
from wsol_core.methods.components import (
    ContrastConfig,
    DropConfig,
    DualBranchMethod,
    InferenceMap,
    NonLocalConfig,
    PairwiseNonLocal,
    ProjectionHead,
    ThresholdMode,
    channel_attention,
    drop_mask,
    info_nce_term,
    masked_mean,
    masked_pool,
    resolve_stage,
    scheduled_theta,
    threshold_masks,
    triplet_term,
)
from wsol_core.models.base import Backbone
from wsol_core.models.head import CAMHead


@dataclass
class SRDConfig(DropConfig):
    """Scheduled region drop (Sec. 3.2). ``enabled = False``: pixel-level erasing at the fixed
    threshold ``theta_drop`` (Table 1's "- SRD" row), i.e. ``kernel_size`` and
    ``schedule_fraction`` are ignored."""

    enabled: bool = True


@dataclass
class CGConfig(ContrastConfig):
    """Contrastive guidance (Sec. 3.3); ``variant`` selects Table 4's rows."""

    variant: Literal["triplet", "infonce", "orig_bg"] = "triplet"
    temperature: float = spec(0.1, gt=0.0, doc="InfoNCE only")
    # Eq. 3: "thresholding the average intensity"; the module docstring gives the measurement.
    threshold_mode: ThresholdMode = "mean"


@dataclass
class FMCGWeights:
    """Weights of eq. 1's terms (all 1 in the paper)."""

    cls: float = spec(1.0, ge=0.0)
    cls_erased: float = spec(1.0, ge=0.0)
    cg: float = spec(1.0, ge=0.0, doc="lambda")


@dataclass
class FMCGConfig(MethodConfig):
    TUNABLE: ClassVar[dict[str, str]] = {
        "theta_drop": "srd.theta_drop",
        "S": "srd.kernel_size",
        "tau_fg": "cg.tau_fg",
        "tau_bg": "cg.tau_bg",
        "margin": "cg.margin",
    }
    SWITCHES: ClassVar[dict[str, str]] = {"srd": "SRD", "cg": "CG", "pnl": "PNL"}
    ABLATED: ClassVar[tuple[str, ...]] = ("srd", "cg", "pnl")  # Table 1 (Sec. 4.2)

    name: str = "fmcg"
    srd: SRDConfig = field(default_factory=SRDConfig)
    cg: CGConfig = field(default_factory=CGConfig)
    pnl: NonLocalConfig = field(default_factory=NonLocalConfig)
    weights: FMCGWeights = field(default_factory=FMCGWeights)
    inference_map: InferenceMap = "erased"  # see the module docstring, "Inference"


class FMCG(DualBranchMethod):
    config_class = FMCGConfig
    cfg: FMCGConfig

    def __init__(self, backbone: Backbone, num_classes: int, cfg: FMCGConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        self.stage = resolve_stage(backbone, cfg.srd.stage, "method.srd.stage")
        channels = backbone.out_channels
        self.pnl = (
            PairwiseNonLocal(channels, cfg.pnl.reduction, cfg.pnl.zero_init, cfg.pnl.scaled)
            if cfg.pnl.enabled
            else None
        )
        self.projection = ProjectionHead(channels, cfg.cg.hidden_dim, cfg.cg.embed_dim) if cfg.cg.enabled else None
        self.head = CAMHead(channels, num_classes)

    # -- SRD -----------------------------------------------------------------------------------

    def theta(self, progress: float) -> float:
        """theta_d at ``progress`` (Sec. 3.2); fixed ``theta_drop`` when SRD is off."""
        srd = self.cfg.srd
        if not srd.enabled:
            return srd.theta_drop
        return scheduled_theta(progress, srd.theta_drop, srd.schedule_fraction)

    def _inference_theta(self) -> float:
        return self.cfg.srd.theta_drop  # "its last drop threshold"

    def _inference_map(self) -> InferenceMap:
        return self.cfg.inference_map

    def srd_mask(self, x: torch.Tensor, theta: float) -> torch.Tensor:
        """Eq. 2 + region expansion on ``X``: ``[B, 1, h, w]``, 1 = erased (pixel-level when SRD is off)."""
        kernel = self.cfg.srd.kernel_size if self.cfg.srd.enabled else 1
        return drop_mask(channel_attention(x.detach()), theta, kernel)

    # -- branches ------------------------------------------------------------------------------

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x, after=self.stage)
        return self.pnl(features) if self.pnl is not None else features

    def _single(self, images: torch.Tensor) -> torch.Tensor:
        return self._tail(self.backbone.forward_features(images, until=self.stage))

    def _dual(self, images: torch.Tensor, theta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.backbone.forward_features(images, until=self.stage)
        dropped = self.srd_mask(x, theta)
        erased = x * (1.0 - dropped).to(x.dtype)  # X_bar = X * M (M: keep mask)
        return self._tail(torch.cat([x, erased], dim=0)), {"drop_mask": dropped}

    # -- CG ------------------------------------------------------------------------------------

    def embed(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 3-4 and the projection head on ``[2B, C, h, w]`` (original branch first).

        Returns ``z`` ``[2B, 2, D]`` (index 0 foreground, 1 background), ``valid`` ``[2B]``
        (both masks non-empty) and the masks ``[2B, 2, h, w]``.
        """
        cg = self.cfg.cg
        if self.projection is None:
            raise RuntimeError("FMCG.embed needs the projection head, which exists only with method.cg.enabled = true")
        fg, bg = threshold_masks(channel_attention(features.detach()), cg.tau_fg, cg.tau_bg, cg.threshold_mode)
        masks = torch.cat([fg, bg], dim=1)
        pooled = masked_pool(features, masks, cg.pooling)  # [2B, 2, C]
        z = self.projection(pooled.flatten(0, 1)).view(pooled.shape[0], 2, -1)
        valid = (masks.sum(dim=(2, 3)) > 0).all(dim=1)
        return {"z": z, "z_valid": valid, "cg_masks": masks}

    def cg_loss(self, z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Eq. 5 (or a Table 4 variant) from ``z`` ``[2B, 2, D]``, averaged over valid images."""
        b = z.shape[0] // 2
        z_fg, z_bg, zb_fg, zb_bg = z[:b, 0], z[:b, 1], z[b:, 0], z[b:, 1]
        cg = self.cfg.cg
        if cg.variant == "infonce":
            negatives = torch.stack([z_bg, zb_bg], dim=1)
            per_image = info_nce_term(z_fg, zb_fg, negatives, cg.temperature) + info_nce_term(
                zb_fg, z_fg, negatives, cg.temperature
            )
        else:
            erased_negative = z_bg if cg.variant == "orig_bg" else zb_bg
            per_image = triplet_term(z_fg, zb_fg, z_bg, cg.margin) + triplet_term(
                zb_fg, z_fg, erased_negative, cg.margin
            )
        return masked_mean(per_image, valid[:b] & valid[b:])

    # -- interface -----------------------------------------------------------------------------

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        theta = self.theta(progress)
        features, extras = self._dual(images, theta)
        outputs = self._split_logits(features)
        outputs.update(extras)
        outputs["srd_theta"] = torch.tensor(theta)
        if self.projection is not None:
            outputs.update(self.embed(features))
        return outputs

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """SRD's erased region (eq. 2 + expansion, on ``X``) and, with CG, eq. 3's foreground and
        background masks of both branches (on ``F`` and ``F_bar``), for the batch's images."""
        masks = {"srd_drop": outputs["drop_mask"][:, 0]}
        if "cg_masks" in outputs:
            b = outputs["logits"].shape[0]
            cg = outputs["cg_masks"]
            masks.update(cg_fg=cg[:b, 0], cg_bg=cg[:b, 1], cg_fg_erased=cg[b:, 0], cg_bg_erased=cg[b:, 1])
        return masks

    def diagnostics(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta_d as the drop saw it this step (Sec. 3.2's schedule)."""
        return {"srd_theta": outputs["srd_theta"]}

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 1: ``cls`` (original), ``cls_erased``, and ``cg`` when CG is on; weighted."""
        w = self.cfg.weights
        terms = self._classification_losses(outputs, batch, w.cls, w.cls_erased)
        if self.projection is not None:
            terms["cg"] = w.cg * self.cg_loss(outputs["z"], outputs["z_valid"])
        return terms
