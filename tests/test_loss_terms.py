"""Every loss term of every method is alive and wired to the right inputs.

For each method, on structured pictures (the synthetic benchmark's creatures, not noise):

- under the method's default config and under every preset's method section (on the tiny
  backbone), every term is non-zero, every contrastive hinge is active on some images and every
  loss mask covers part of the map, not none or all of it (a dead loss fails here);
- each term alone sends a non-zero gradient into the modules it must train, and the project's
  probes send none into the backbone;
- each contrastive term equals the paper's formula computed here with plain torch from the
  method's own outputs (a negative or positive taken from the wrong branch or view fails here).

``benchmarks/mutants.py`` applies the mutants these tests must kill.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.readings import batch_of, pictures
from wsol_core.config import load_config, preset_names
from wsol_core.data.batch import Batch
from wsol_core.methods import build_method

METHODS = ("cam", "fmcg", "icl", "caml", "c2am", "regressor")
IMAGES, LABELS, BOXES = pictures(8, upright=True, body_texture=True)


def _batch() -> Batch:
    # The box regressor learns from pseudo boxes through each crop's window: the creatures' own
    # boxes here, seen whole (the batch's GT rows stay zero, so a regressor fed GT learns nothing).
    batch = batch_of(IMAGES, LABELS)
    side = float(IMAGES.shape[-1])
    batch.views = torch.tensor([[0.0, 0.0, side, side, 0.0]] * len(IMAGES))
    corners = []
    for mask in BOXES:  # the creatures' GT boxes, from their box masks
        ys, xs = mask.nonzero(as_tuple=True)
        corners.append([xs.min(), ys.min(), xs.max(), ys.max()])
    batch.pseudo_boxes = torch.tensor(corners, dtype=torch.float32)
    return batch


def _build(method: str, overrides=(), method_section: dict | None = None, seed: int = 0):
    base = {"model": {"backbone": "tiny"}, "method": method_section or {"name": method}}
    torch.manual_seed(seed)
    return build_method(load_config(base=base, overrides=list(overrides)), 10)


def _forward(model, progress: float = 0.5):
    model.train()
    torch.manual_seed(1)
    out = model(IMAGES, LABELS, progress)
    return out, model.losses(out, _batch())


def _preset_method_sections() -> list[tuple[str, dict]]:
    from wsol_core.config import to_dict

    return [(name, to_dict(load_config([name]).method)) for name in preset_names()]


# ---------------------------------------------------------------------------------------------
# Alive under the defaults and the presets
# ---------------------------------------------------------------------------------------------

EXPECTED_TERMS = {
    "cam": {"cls"},
    "fmcg": {"cls", "cls_erased", "cg"},
    "icl": {"cls", "cls_erased", "cal", "fcl"},
    "caml": {"cls", "caml", "probe"},
    "c2am": {"neg", "pos_fg", "pos_bg", "cls"},
    "regressor": {"box"},
}


def _assert_alive(model, label: str) -> None:
    out, terms = _forward(model)
    name = model.cfg.name
    assert EXPECTED_TERMS[name] <= set(terms), f"{label}: terms {sorted(terms)}"
    for term, value in terms.items():
        assert torch.isfinite(value) and value.item() > 0, f"{label}: term {term} = {value.item()} (dead)"
    for mask_name, mask in model.loss_masks(out).items():
        area = mask.float().mean(dim=(1, 2))
        assert 0.0 < area.mean().item() < 1.0, f"{label}: mask {mask_name} covers {area.mean().item():.3f} of the map"
    if name == "caml":  # eq. 4's hinges active on some images
        from wsol_core.methods.caml import l2_distance

        c = model.cfg.caml
        hinge = l2_distance(out["caml_a1"], out["caml_p1"]) - l2_distance(out["caml_a1"], out["caml_n1"]) + c.margin
        assert (hinge > 0).float().mean().item() > 0.5, (
            f"{label}: eq. 4 hinge active on {(hinge > 0).float().mean():.2f}"
        )
    if name in ("fmcg", "icl"):  # both masks of eq. 3 non-empty on most images
        assert out["z_valid"].float().mean().item() >= 0.5, f"{label}: eq. 3 masks empty on most images"


@pytest.mark.parametrize("method", METHODS)
def test_every_term_is_alive_under_the_default_config(method):
    _assert_alive(_build(method), f"{method} default")


@pytest.mark.parametrize("preset, section", _preset_method_sections(), ids=[n for n, _ in _preset_method_sections()])
def test_every_term_is_alive_under_each_preset(preset, section):
    section = dict(section)
    if section["name"] == "c2am":
        section["concat_stage"] = "block3"  # the tiny backbone's analogue of ResNet's layer3
    _assert_alive(_build(section["name"], method_section=section), preset)


# ---------------------------------------------------------------------------------------------
# Each term trains the modules it must train
# ---------------------------------------------------------------------------------------------

TRAINS = {  # term -> modules whose parameters it must move (attribute paths)
    "cam": {"cls": ("backbone", "head")},
    "fmcg": {"cls": ("backbone", "head"), "cls_erased": ("backbone", "head"), "cg": ("backbone", "projection")},
    "icl": {
        "cls": ("backbone", "head"),
        "cls_erased": ("backbone", "head"),
        "cal": ("backbone", "projection"),
        "fcl": ("backbone",),
    },
    "caml": {"cls": ("backbone", "heads", "eca"), "caml": ("backbone", "eca"), "probe": ("probe",)},
    "c2am": {
        "neg": ("backbone", "activation_head"),
        "pos_fg": ("backbone", "activation_head"),
        "pos_bg": ("backbone", "activation_head"),
        "cls": ("probe",),
    },
    "regressor": {"box": ("backbone", "box_head")},
}
NEVER = {("caml", "probe"): ("backbone", "eca"), ("c2am", "cls"): ("backbone", "activation_head")}


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("method, term", [(m, t) for m in METHODS for t in TRAINS[m]])
def test_each_term_alone_trains_its_modules(method, term):
    model = _build(method)
    _, terms = _forward(model)
    model.zero_grad(set_to_none=True)
    terms[term].backward()
    for path in TRAINS[method][term]:
        assert _grad_norm(getattr(model, path)) > 0, f"{method}: term {term} sends no gradient into {path}"
    for path in NEVER.get((method, term), ()):
        assert _grad_norm(getattr(model, path)) == 0, f"{method}: the probe's {term} leaks into {path}"


# ---------------------------------------------------------------------------------------------
# The contrastive terms take their positives and negatives from the right branch / view
# ---------------------------------------------------------------------------------------------


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1)


def test_fmcg_eq5_from_its_own_embeddings():
    """Eq. 5: max(|z_fg - zb_fg| - |z_fg - z_bg| + m, 0) + max(|zb_fg - z_fg| - |zb_fg - zb_bg| + m, 0)."""
    model = _build("fmcg")
    out, terms = _forward(model)
    b = IMAGES.shape[0]
    z = out["z"].detach()
    z_fg, z_bg, zb_fg, zb_bg = z[:b, 0], z[:b, 1], z[b:, 0], z[b:, 1]
    m = model.cfg.cg.margin
    per = (_dist(z_fg, zb_fg) - _dist(z_fg, z_bg) + m).clamp_min(0) + (
        _dist(zb_fg, z_fg) - _dist(zb_fg, zb_bg) + m
    ).clamp_min(0)
    valid = (out["z_valid"][:b] & out["z_valid"][b:]).float()
    assert valid.sum() > 0
    torch.testing.assert_close(terms["cg"].detach(), (per * valid).sum() / valid.sum())


def test_icl_contrastive_attention_from_its_own_embeddings():
    """max(|zb_fg - z_fg| - |zb_fg - z_bg| + m, 0): erased foreground anchor, original foreground
    positive, original background negative."""
    model = _build("icl")
    out, terms = _forward(model)
    z = out["z"].detach()
    per = (_dist(z[:, 2], z[:, 0]) - _dist(z[:, 2], z[:, 1]) + model.cfg.cal.margin).clamp_min(0)
    valid = out["z_valid"].float()
    assert valid.sum() > 0
    torch.testing.assert_close(terms["cal"].detach(), (per * valid).sum() / valid.sum())


def test_c2am_eq2_7_8_from_its_own_representations():
    """Eq. 2 over all fg-bg pairs; eqs. 7-8 over fg-fg and bg-bg pairs with rank weights (eq. 5)."""
    model = _build("c2am")
    out, terms = _forward(model)
    cfg = model.cfg
    fg, bg = F.normalize(out["fg"].detach(), dim=1), F.normalize(out["bg"].detach(), dim=1)
    eps = cfg.sim_eps
    neg = -torch.log(1 - (fg @ bg.T).clamp(eps, 1 - eps)).mean()
    torch.testing.assert_close(terms["neg"].detach(), neg)
    n = fg.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    for name, v in (("pos_fg", fg), ("pos_bg", bg)):
        s = (v @ v.T).clamp(eps, 1 - eps)
        rank = torch.empty_like(s)
        for i in range(n):  # rank within the row, the most similar pair first (released code)
            others = [j for j in range(n) if j != i]
            order = sorted(others, key=lambda j: -float(s[i, j]))
            for r, j in enumerate(order):
                rank[i, j] = r
        w = torch.where(off, torch.exp(-cfg.alpha * rank), torch.zeros_like(s))
        expected = -(w * torch.log(s))[off].sum() / (n * (n - 1))
        torch.testing.assert_close(terms[name].detach(), expected)


# ---------------------------------------------------------------------------------------------
# FMCG's SRD schedule, as the training loop drives it
# ---------------------------------------------------------------------------------------------


def test_srd_theta_falls_over_the_epochs_in_the_training_loop():
    """The loop's ``progress`` drives theta_d: from 1 to theta_drop during the warm-up (the first
    0.3 of training by default), then flat; ``train/srd_theta`` is the per-epoch mean the method saw."""
    from wsol_core.train.loop import train_one_epoch
    from wsol_core.train.optim import build_optimizer, build_scheduler

    cfg = load_config(
        base={"model": {"backbone": "tiny"}, "method": {"name": "fmcg"}, "train": {"epochs": 4}},
        overrides=["method.srd.theta_drop=0.7"],
    )
    torch.manual_seed(0)
    model = build_method(cfg, 10)
    batches = [_batch()] * 5
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg.optim, len(batches), cfg.train.epochs)
    seen = []
    for epoch in range(cfg.train.epochs):
        metrics = train_one_epoch(
            model, model, batches, optimizer, scheduler, cfg, torch.device("cpu"), epoch, len(batches), False
        )
        seen.append(metrics["train/srd_theta"])
        assert 0.0 <= metrics["train/mask_srd_drop_area"] <= 1.0 and metrics["train/loss_cg"] > 0
    # 20 steps, warm-up over the first 6: epoch 1 averages 1, .95, .9, .85, .8; then 0.75, 0.7 x4.
    assert seen[0] == pytest.approx(0.9) and seen[1] == pytest.approx((0.75 + 0.7 * 4) / 5)
    assert seen[2] == seen[3] == pytest.approx(0.7)
