"""C2AM: contrastive learning of a class-agnostic activation map.

Xie, Xiang, Chen, Hou, Zhao, Shen, "C²AM: Contrastive learning of Class-agnostic Activation Map
for Weakly Supervised Object Localization and Semantic Segmentation", CVPR 2022 (code released as
CVI-SZU/CCAM). Section numbers and equations below are the paper's.

What is implemented (Sec. 3.1-3.3):

- an activation head ``phi`` (3x3 conv to one channel + batch norm, then a sigmoid) on the
  encoder's feature map ``Z`` gives the class-agnostic map ``P`` in [0, 1];
- eq. 1: foreground / background representations ``v_f = P (x) Z^T``, ``v_b = (1 - P) (x) Z^T``
  (:func:`fg_bg_representations`);
- eq. 2-3: the negative loss over every foreground-background pair of the batch, within and
  across images: ``-1/n^2 sum_ij log(1 - sim(v_i^f, v_j^b))`` (:func:`negative_loss`);
- eq. 4-8: the positive losses over foreground-foreground and background-background pairs of
  different images, each weighted by the rank weight ``exp(-alpha * rank(s_ij))``
  (:func:`rank_weights`, :func:`positive_loss`);
- eq. 9: ``L = L_POS + L_NEG``; :meth:`C2AM.losses` returns the three terms ``neg``, ``pos_fg``,
  ``pos_bg`` (the loop sums them, so their sum is eq. 9).

No class label touches the map (``uses_labels = False``); a batch may be entirely unlabeled.

Everything runs in ONE backbone pass; the cross-image terms are [B, B] matrices (per worker:
like the released code, which trains ImageNet with DDP and contrasts each GPU's share of the
batch, nothing is gathered across ranks).

**Orientation (foreground or background?).** The loss is symmetric in ``P`` and ``1 - P`` (eq. 2
is a sum over all (i, j) and eqs. 7-8 have the same form), so training may end with the
background activated. The paper only says (end of Sec. 3.3) "we set a threshold to binarize the
class-agnostic activation maps and detect the largest contour to determine the object regions";
it does not describe how the sign is chosen. The released code (CVI-SZU/CCAM,
``WSOL/train_CCAM_CUB.py`` and ``train_CCAM_ILSVRC.py``) decides it ONCE, at the last training
iteration of epoch 0 (``epoch == 0 and i == len(train_loader) - 1``), on image 0 of that batch
only (``check_positive`` reads ``am[0, 0]``): it binarizes the map at 0.5, averages the
first/last row and first/last column, and if that border mean is above 0.5 (the border is mostly
"foreground") it uses ``1 - P`` from then on, for evaluation and box extraction. Here this is
the buffer ``orientation`` (+1 keeps ``P``, -1 uses ``1 - P``) and ``orientation_calibrated``,
both in the state dict so a resumed run keeps the decision, set by
:meth:`C2AM.calibrate_orientation` and applied by :meth:`C2AM.inference`. The training loop's
generic hooks call it once:

- ``orientation_check = "epoch_end"`` (default, the released scripts): :meth:`C2AM.after_epoch`
  after the first epoch, on the maps of that epoch's last training step;
- ``"step"``: :meth:`C2AM.after_step` after the optimizer step ``orientation_check_step``;
- ``"first_eval"``, and in any mode if nothing has decided yet: :meth:`C2AM.before_evaluation`
  with ``method.raw_maps(images)`` of the first validation batch.

``orientation_images`` images of the checked batch vote (1 by default, the released code's
image 0; 0 = all of them). Under DDP the border statistics are all-reduced, so every rank takes
the same decision. Evaluation scores both sides (:meth:`C2AM.inference_variants`, logged as
``<split>/maxboxacc_v2_map_p`` and ``_one_minus_p`` beside the chosen map's ``maxboxacc_v2``), so
a wrong call is visible on val as the rejected side scoring higher.

**Classification.** C2AM itself has no classifier: the paper follows PSOL and classifies with a
separate network (Sec. 3.4). As the project's addition, ``probe_classifier`` (default on) trains
a linear probe (GAP + linear) on DETACHED final backbone features with cross-entropy on the
labelled samples (``label >= 0``); it never changes the maps or the backbone, and gives
``inference`` its logits (None when off) so Top-1/Top-5 Loc can be computed.

**Ambiguities and their defaults** (config options, see :class:`C2AMConfig`):

- ``rank_scope``: eq. 5 ranks ``s_ij`` "in the set s^f" of all pairs i != j (a batch-wide
  rank); the released code ranks each similarity within its row (the pairs of image i,
  ``sim.sort(dim=1)``). Default ``"row"`` (the released code, with which the published numbers
  were obtained); ``"global"`` is the literal reading. Rank 0 is the most similar pair (weight 1),
  so weights are in (0, 1] off the diagonal, exactly 1 at ``alpha = 0``; ties are broken by index.
- ``pool_norm``: eq. 1 is a plain sum over positions; the released code divides by H*W. Cosine
  similarity is invariant to a positive per-vector scale, so every choice gives the same losses;
  ``"hw"`` (default) keeps magnitudes small, ``"mass"`` divides by ``sum P`` / ``sum (1 - P)``
  (a weighted mean), ``"none"`` is eq. 1 literally.
- ``sim_eps``: eq. 7-8 take ``log(s)`` and eq. 2 ``log(1 - s)``, undefined at s <= 0 / s = 1.
  The released code clamps cosine similarities to [5e-4, 1 - 5e-4] (gradients stop outside);
  same here.
- Normalisation of eqs. 7-8: the paper's ``1 / (n (n - 1))`` over pairs i != j (the released code
  averages over all n^2 entries including the diagonal, a factor (n - 1) / n and a ~5e-4 offset).
  With a batch of one there are no pairs: the positive terms are 0.
- ``alpha`` default 0.05: the released code's default and the value its README uses with
  supervised ImageNet initialisation (0.75 with MoCo/DetCo initialisation). Fig. 8 sweeps 0-0.9
  on ImageNet; alpha = 0 (no rank weighting) is the worst setting there.
- ``concat_stage``: the paper says ``Z`` is the encoder's feature map; the released ResNet50
  concatenates layer3's output to layer4's (FDIM 2048 + 1024). Default ``""`` (final features
  only); the ResNet50 presets set ``layer3``. An earlier stage at a larger resolution is
  average-pooled to the final map's size.
- ``head_init``: Table 6 shows the head's initialisation barely matters; the released code uses
  PyTorch's default conv init (``"default"``).
- ``official_param_groups``: the released optimizer's groups as its code builds them. Its
  ``get_parameter_groups`` collects only conv weights (and GroupNorm's): every BatchNorm affine
  parameter is left out (never updated; running statistics still are). It means the activation
  head for the 10x group (``from_scratch_layers = [self.ac_head]``), but tests each *Conv2d*
  for membership in that list, which holds the head's parent module, so the head's conv lands in
  the backbone's group: the whole encoder **and the activation head learn at ``lr``**, and the
  10x / 20x groups are empty (found by running the released model and optimizer on 2026-12-02:
  54 conv weights in group 0, the head's among them, groups 1-3 empty, 108 BatchNorm tensors in
  none; BENCHMARKS.md, "C2AM's released learning rates"). The published numbers come from that
  code, so this reading is the one reproduced; the project's linear probe, which the released
  code does not have and which reads detached features, stays at ``lr * head_lr_mult``. Off by
  default (the project's protocol groups: head stages at 10x); the ResNet50 presets turn it on.
  When on, BatchNorm weights/biases are frozen (``requires_grad = False``) and get no gradient.

Ablation switches: ``alpha = 0`` (no rank weighting, Fig. 8), ``head_init`` (Table 6),
``rank_scope``, and ``neg_weight`` / ``pos_fg_weight`` / ``pos_bg_weight`` (0 drops a term).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wsol_core.config_fields import ConfigError, MethodConfig, spec
from wsol_core.data.batch import Batch
from wsol_core.methods.base import Inference, WSOLMethod
from wsol_core.methods.components import no_autocast
from wsol_core.models.base import Backbone
from wsol_core.models.head import CAMHead


@dataclass
class C2AMConfig(MethodConfig):
    """C2AM's settings. See the module docstring for how each ambiguous choice was made."""

    TUNABLE: ClassVar[dict[str, str]] = {"alpha": "alpha"}

    name: str = "c2am"
    # Eq. 5: w = exp(-alpha * rank); 0 gives every positive pair weight 1.
    alpha: float = spec(0.05, ge=0.0, doc="rank-weight smoothness (eq. 5)")
    rank_scope: Literal["row", "global"] = "row"
    # Cosine similarities are clamped to [sim_eps, 1 - sim_eps] before the logs of eqs. 2, 7, 8.
    sim_eps: float = spec(5e-4, gt=0.0, lt=0.5)
    pool_norm: Literal["hw", "mass", "none"] = "hw"
    # Eq. 9 is an unweighted sum; 0 drops a term (ablations).
    neg_weight: float = spec(1.0, ge=0.0)
    pos_fg_weight: float = spec(1.0, ge=0.0)
    pos_bg_weight: float = spec(1.0, ge=0.0)
    # A backbone stage whose output is concatenated to the final features ("" = none).
    concat_stage: str = ""
    head_init: Literal["default", "kaiming_normal", "kaiming_uniform", "normal", "uniform", "xavier_uniform"] = (
        "default"
    )
    # When the loop calls calibrate_orientation (see the module docstring).
    orientation_check: Literal["epoch_end", "step", "first_eval"] = "epoch_end"
    orientation_check_step: int = spec(300, ge=0, doc="global step of the check (orientation_check = step)")
    # Images of the checked batch that vote (0 = all); the released code looks at image 0 only.
    orientation_images: int = spec(1, ge=0, doc="images of the checked batch used by the check, 0 = all")
    orientation_threshold: float = spec(0.5, gt=0.0, lt=1.0, doc="binarization threshold of the check")
    orientation_border: int = spec(1, ge=1, doc="border width in map pixels for the check")
    # The project's addition: a linear probe on detached features for Top-1/Top-5 Loc.
    probe_classifier: bool = True
    official_param_groups: bool = False

    def validate(self, path: str) -> None:
        if self.neg_weight == 0 and self.pos_fg_weight == 0 and self.pos_bg_weight == 0:
            raise ConfigError(
                f"{path}.neg_weight, {path}.pos_fg_weight and {path}.pos_bg_weight are all 0; "
                "at least one contrastive term (eq. 9) must be on"
            )
        if self.concat_stage != self.concat_stage.strip():
            raise ConfigError(f"{path}.concat_stage = {self.concat_stage!r} has surrounding spaces")


# ---------------------------------------------------------------------------------------------
# The paper's terms, as functions of tensors (unit-tested against hand computations)
# ---------------------------------------------------------------------------------------------


def fg_bg_representations(
    maps: torch.Tensor, features: torch.Tensor, pool_norm: str = "hw"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: ``v_f = P (x) Z^T``, ``v_b = (1 - P) (x) Z^T``.

    Args:
        maps: ``P``, ``[B, h, w]`` or ``[B, 1, h, w]`` in [0, 1].
        features: ``Z``, ``[B, C, h, w]`` (any dtype / memory format).
        pool_norm: ``"none"`` (eq. 1 literally), ``"hw"`` (divide by h*w, the released code) or
            ``"mass"`` (divide by ``sum P`` resp. ``sum (1 - P)``). The cosines of eqs. 2-8 are
            the same for all three.

    Returns:
        ``(v_f, v_b)``, each ``[B, C]`` float32.
    """
    b, c, h, w = features.shape
    with no_autocast(features.device):
        p = maps.reshape(b, h * w).float()
        weights = torch.stack([p, 1.0 - p], dim=1)  # [B, 2, HW]
        # NHWC view: free for channels_last features, one copy otherwise.
        z = features.float().permute(0, 2, 3, 1).reshape(b, h * w, c)  # Z^T, [B, HW, C]
        v = torch.bmm(weights, z)  # [B, 2, C]
        if pool_norm == "hw":
            v = v / float(h * w)
        elif pool_norm == "mass":
            v = v / weights.sum(dim=2, keepdim=True).clamp_min(1e-6)
        elif pool_norm != "none":
            raise ValueError(f"pool_norm must be 'hw', 'mass' or 'none', got {pool_norm!r}")
    return v[:, 0], v[:, 1]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Eqs. 3-4: ``s_ij = sim(a_i, b_j)``, ``[n, n]`` float32, clamped to [eps, 1 - eps]."""
    with no_autocast(a.device):
        a = F.normalize(a.float(), dim=1, eps=1e-12)
        b = F.normalize(b.float(), dim=1, eps=1e-12)
        return (a @ b.T).clamp(eps, 1.0 - eps)


def negative_loss(s_neg: torch.Tensor) -> torch.Tensor:
    """Eq. 2: ``-1/n^2 sum_i sum_j log(1 - s_ij^neg)`` over all fg-bg pairs, i = j included."""
    with no_autocast(s_neg.device):
        return -torch.log1p(-s_neg.float()).mean()


@torch.no_grad()
def rank_weights(sim: torch.Tensor, alpha: float, scope: str = "row") -> torch.Tensor:
    """Eq. 5: ``w_ij = exp(-alpha * rank(s_ij))`` for i != j, 0 on the diagonal.

    ``rank`` is 0 for the most similar pair: within row i (``scope="row"``, the released code) or
    among all n(n-1) off-diagonal pairs (``scope="global"``, the paper's "in the set s^f").
    Weights are constants (no gradient), in (0, 1] off the diagonal, all 1 when ``alpha == 0``.
    """
    n = sim.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    s = sim.detach().float().masked_fill(~off, float("-inf"))  # the diagonal ranks last
    if scope == "row":
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        rank = torch.argsort(order, dim=1, stable=True)
    elif scope == "global":
        order = torch.argsort(s.reshape(-1), descending=True, stable=True)
        rank = torch.argsort(order, stable=True).reshape(n, n)
    else:
        raise ValueError(f"scope must be 'row' or 'global', got {scope!r}")
    weights = torch.exp(-alpha * rank.float())
    return torch.where(off, weights, torch.zeros_like(weights))


def positive_loss(sim: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eqs. 7-8: ``-1/(n(n-1)) sum_{i != j} w_ij log(s_ij)`` (0 for a batch of one)."""
    n = sim.shape[0]
    with no_autocast(sim.device):
        off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
        terms = torch.where(off, weights.float() * torch.log(sim.float()), torch.zeros((), device=sim.device))
        return -terms.sum() / max(n * (n - 1), 1)


def contrastive_terms(fg: torch.Tensor, bg: torch.Tensor, cfg: C2AMConfig) -> dict[str, torch.Tensor]:
    """Eq. 9 as weighted terms of eq. 1's representations ``fg`` / ``bg`` ``[B, C]``: ``neg``
    (eq. 2), ``pos_fg`` (eq. 7), ``pos_bg`` (eq. 8); a term whose weight is 0 is left out."""
    terms: dict[str, torch.Tensor] = {}
    if cfg.neg_weight > 0:
        terms["neg"] = cfg.neg_weight * negative_loss(cosine_matrix(fg, bg, cfg.sim_eps))
    for name, weight, v in (("pos_fg", cfg.pos_fg_weight, fg), ("pos_bg", cfg.pos_bg_weight, bg)):
        if weight > 0:
            sim = cosine_matrix(v, v, cfg.sim_eps)
            terms[name] = weight * positive_loss(sim, rank_weights(sim, cfg.alpha, cfg.rank_scope))
    return terms


def border_foreground_fraction(maps: torch.Tensor, threshold: float = 0.5, border: int = 1) -> torch.Tensor:
    """The released code's orientation statistic, per image: binarize at ``threshold``
    (``> threshold`` is 1) and average the means of the top rows, bottom rows, left columns and
    right columns (``border`` pixels wide). ``[B, h, w]`` -> ``[B]`` float32."""
    m = (maps.detach().float().reshape(maps.shape[0], maps.shape[-2], maps.shape[-1]) > threshold).float()
    k = max(1, min(border, m.shape[1], m.shape[2]))
    total = torch.zeros(m.shape[0], device=m.device)
    for part in (m[:, :k, :], m[:, -k:, :], m[:, :, :k], m[:, :, -k:]):
        total = total + part.mean(dim=(1, 2))
    return total / 4.0


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


class C2AM(WSOLMethod):
    """Class-agnostic activation map learned by cross-image fg/bg contrast (no labels)."""

    config_class = C2AMConfig
    cfg: C2AMConfig  # what config_class guarantees (checked in WSOLMethod.__init__)
    orientation: torch.Tensor  # buffers (register_buffer in __init__)
    orientation_calibrated: torch.Tensor
    uses_labels = False

    def __init__(self, backbone: Backbone, num_classes: int, cfg: C2AMConfig) -> None:
        super().__init__(backbone, num_classes, cfg)
        channels = backbone.out_channels
        if cfg.concat_stage:
            if cfg.concat_stage == backbone.stage_names[-1]:
                raise ValueError(
                    f"method.concat_stage = {cfg.concat_stage!r} is the final stage; choose an earlier one of {backbone.stage_names[:-1]}"
                )
            channels += backbone.stage_channels(cfg.concat_stage)  # ValueError naming the stages
        # Sec. 3.1: phi = 3x3 conv + BN; the sigmoid follows in _activation. No conv bias (BN).
        self.activation_head = nn.Conv2d(channels, 1, kernel_size=3, padding=1, bias=False)
        self.bn_head = nn.BatchNorm2d(1)
        _init_head(self.activation_head, cfg.head_init)
        self.probe = CAMHead(backbone.out_channels, num_classes) if cfg.probe_classifier and num_classes > 0 else None
        # +1: P is the foreground map; -1: 1 - P is. Decided once (calibrate_orientation).
        self.register_buffer("orientation", torch.tensor(1.0))
        self.register_buffer("orientation_calibrated", torch.tensor(False))
        self._calibrated = False  # Python mirror: orientation_due() needs no device sync
        self._last_maps: torch.Tensor | None = None  # orientation_check = "epoch_end": the step's maps
        self.register_load_state_dict_post_hook(_sync_calibrated_flag)
        if cfg.official_param_groups:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(False)

    # -- network --------------------------------------------------------------------------

    def _features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone pass: (``Z`` for the activation head, final features for the probe)."""
        stage = self.cfg.concat_stage
        if not stage:
            final = self.backbone(images)
            return final, final
        mid = self.backbone.forward_features(images, until=stage)
        final = self.backbone.forward_features(mid, after=stage)
        if mid.shape[-2:] != final.shape[-2:]:
            mid = F.adaptive_avg_pool2d(mid, (final.shape[-2], final.shape[-1]))
        return torch.cat([final, mid], dim=1), final

    def _activation(self, features: torch.Tensor) -> torch.Tensor:
        """Sec. 3.1: ``P = sigmoid(BN(conv3x3(Z)))``, ``[B, h, w]`` float32."""
        logits = self.bn_head(self.activation_head(features))
        return torch.sigmoid(logits.float())[:, 0]

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, progress: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Training forward (labels are ignored by the maps). Outputs: ``raw_maps`` (P before the
        orientation, ``[B, h, w]``), ``fg`` / ``bg`` (eq. 1, ``[B, C]`` float32) and, with the
        probe, ``logits`` from detached features."""
        features, final = self._features(images)
        maps = self._activation(features)
        fg, bg = fg_bg_representations(maps, features, self.cfg.pool_norm)
        out = {"raw_maps": maps, "fg": fg, "bg": bg}
        if self.probe is not None:
            out["logits"] = self.probe(final.detach())
        return out

    def loss_masks(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 1's soft masks as the losses use them, before the orientation: ``P`` pools the
        foreground representation, ``1 - P`` the background one."""
        maps = outputs["raw_maps"].float()
        return {"fg": maps, "bg": 1.0 - maps}

    def losses(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Eq. 9 as weighted terms ``neg`` (eq. 2), ``pos_fg`` (eq. 7), ``pos_bg`` (eq. 8), plus the
        probe's ``cls`` (labelled samples only; 0 when none is labelled)."""
        terms = contrastive_terms(outputs["fg"], outputs["bg"], self.cfg)
        if self.probe is not None and "logits" in outputs:
            terms["cls"] = probe_loss(outputs["logits"], batch.labels)
        return terms

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``P`` without the orientation, ``[B, h, w]`` (for :meth:`calibrate_orientation`)."""
        features, _ = self._features(images)
        return self._activation(features)

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        """The class-agnostic map with the orientation applied (``P`` or ``1 - P``); the probe's
        logits or None. ``labels`` are not used."""
        features, final = self._features(images)
        maps = self._activation(features)
        maps = 0.5 + self.orientation.to(maps.dtype) * (maps - 0.5)  # P, or 1 - P: no branch
        logits = self.probe(final) if self.probe is not None else None
        return Inference(logits=logits, maps=maps)

    @torch.no_grad()
    def inference_variants(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Both orientations, ``p`` (``P``) and ``one_minus_p`` (``1 - P``), so that evaluation
        scores the side the orientation check rejected beside the one it chose
        (``<split>/maxboxacc_v2_map_p`` / ``_one_minus_p``): a wrong call shows as the rejected
        side scoring higher, a map that splits the image along something other than the object
        as both sides scoring low."""
        maps = self.raw_maps(images)
        return {"p": maps, "one_minus_p": 1.0 - maps}

    # -- the one-time orientation decision ------------------------------------------------

    def after_step(self, step: int, outputs: dict[str, torch.Tensor]) -> None:
        if self.orientation_due(step):
            self.calibrate_orientation(outputs["raw_maps"].detach())
        elif not self._calibrated and self.cfg.orientation_check == "epoch_end":
            self._last_maps = outputs["raw_maps"].detach()  # the epoch's last step is checked

    def after_epoch(self, epoch: int) -> None:
        """``orientation_check = "epoch_end"``: decide on the last training step's maps of the
        first epoch, as the released scripts do (``epoch == 0 and i == len(train_loader) - 1``)."""
        maps = self._last_maps
        if maps is not None and not self._calibrated:
            self.calibrate_orientation(maps)
        self._last_maps = None

    def before_evaluation(self, images: torch.Tensor) -> None:
        if self.orientation_due(0, evaluating=True):
            self.calibrate_orientation(self.raw_maps(images))

    def orientation_due(self, step: int, evaluating: bool = False) -> bool:
        """Whether the loop should call :meth:`calibrate_orientation` now: not yet decided and
        either ``step >= orientation_check_step`` (mode ``"step"``) or an evaluation is about
        to start. Reads no tensor."""
        if self._calibrated:
            return False
        return evaluating or (self.cfg.orientation_check == "step" and step >= self.cfg.orientation_check_step)

    @torch.no_grad()
    def calibrate_orientation(self, maps: torch.Tensor, force: bool = False) -> float:
        """Decide once whether ``P`` or ``1 - P`` is the foreground (released code's check).

        ``maps`` are RAW maps ``P`` (``outputs["raw_maps"]`` or :meth:`raw_maps`), ``[B, h, w]``
        or ``[B, 1, h, w]``. If the binarized border is mostly on (mean over the batch, and over
        ranks under DDP, > 0.5) the orientation becomes -1, else +1. A second call is a no-op
        unless ``force``. Collective under DDP: every rank must call it at the same step.
        Returns the orientation.
        """
        if self._calibrated and not force:
            return float(self.orientation)
        if self.cfg.orientation_images:
            maps = maps[: self.cfg.orientation_images]
        fraction = border_foreground_fraction(maps, self.cfg.orientation_threshold, self.cfg.orientation_border)
        stats = torch.stack([fraction.sum(), torch.tensor(float(fraction.numel()), device=fraction.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        flip = bool(stats[0] / stats[1].clamp_min(1.0) > 0.5)
        self.orientation.fill_(-1.0 if flip else 1.0)
        self.orientation_calibrated.fill_(True)
        self._calibrated = True
        return -1.0 if flip else 1.0

    # -- optimizer groups -----------------------------------------------------------------

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """The protocol's groups, or with ``official_param_groups`` the released code's as it
        runs: the whole backbone and the activation head at ``lr`` (the module docstring says
        why not 10x), BatchNorm affine parameters frozen; only the project's probe at
        ``lr * head_lr_mult``."""
        if not self.cfg.official_param_groups:
            return super().param_groups(lr, head_lr_mult)
        encoder_and_head: list[nn.Parameter] = []
        probe: list[nn.Parameter] = []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (probe if name.startswith("probe.") else encoder_and_head).append(param)
        return [
            {"params": encoder_and_head, "lr": lr, "name": "trunk"},
            {"params": probe, "lr": lr * head_lr_mult, "name": "head"},
        ]


def probe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The project's probe: mean cross-entropy over samples with ``label >= 0`` (0 if none)."""
    with no_autocast(logits.device):
        known = labels >= 0
        per_sample = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
        return torch.where(known, per_sample, torch.zeros_like(per_sample)).sum() / known.sum().clamp_min(1)


def _init_head(conv: nn.Conv2d, scheme: str) -> None:
    """Table 6's initialisations (PyTorch's ``nn.init`` defaults) or PyTorch's conv default."""
    if scheme == "default":
        conv.reset_parameters()
    elif scheme == "kaiming_normal":
        nn.init.kaiming_normal_(conv.weight)
    elif scheme == "kaiming_uniform":
        nn.init.kaiming_uniform_(conv.weight)
    elif scheme == "normal":
        nn.init.normal_(conv.weight)
    elif scheme == "uniform":
        nn.init.uniform_(conv.weight)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(conv.weight)
    else:
        raise ValueError(f"unknown head_init {scheme!r}")


def _sync_calibrated_flag(module: C2AM, incompatible_keys) -> None:
    """After ``load_state_dict``: mirror the loaded buffer into the Python flag."""
    module._calibrated = bool(module.orientation_calibrated)


__all__ = [
    "C2AM",
    "C2AMConfig",
    "border_foreground_fraction",
    "contrastive_terms",
    "cosine_matrix",
    "fg_bg_representations",
    "negative_loss",
    "positive_loss",
    "probe_loss",
    "rank_weights",
]
