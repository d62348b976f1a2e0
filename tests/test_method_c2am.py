"""C2AM (Xie et al., CVPR 2022): eqs. 1-9 against hand computations, the one-time orientation
check, the detached probe, shapes on every backbone, a CPU smoke fit and config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from wsol_core.config import ConfigError, load_config
from wsol_core.data.batch import Batch
from wsol_core.methods import build_method
from wsol_core.methods.c2am import (
    C2AM,
    C2AMConfig,
    border_foreground_fraction,
    contrastive_terms,
    cosine_matrix,
    fg_bg_representations,
    negative_loss,
    positive_loss,
    probe_loss,
    rank_weights,
)
from wsol_core.models import build_backbone

EPS = 5e-4


def _cfg(**method) -> C2AMConfig:
    return load_config(base={"method": {"name": "c2am", **method}}).method


def _model(backbone: str = "tiny", num_classes: int = 5, large: bool = False, **method) -> C2AM:
    torch.manual_seed(0)
    return C2AM(build_backbone(backbone, large_feature_map=large), num_classes, _cfg(**method))


def _batch(images: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
    n = images.shape[0]
    return Batch(
        images=images,
        labels=torch.full((n,), -1, dtype=torch.long) if labels is None else labels,
        keys=[str(i) for i in range(n)],
        orig_sizes=torch.full((n, 2), images.shape[-1], dtype=torch.long),
        boxes=torch.zeros(n, 0, 4),
        num_boxes=torch.zeros(n, dtype=torch.long),
    )


def _clamp(x: float) -> float:
    return min(max(x, EPS), 1 - EPS)


def _cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# --------------------------------------------------------------------------- eq. 1


def test_representations_eq1_by_hand():
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])  # P, 1x2x2
    z = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # Z, 1x2(C)x2x2
    # v_f = sum_k P_k Z_:,k = [1*1 + .5*3, .5*1] ; v_b = sum_k (1 - P_k) Z_:,k = [2 + 1.5 + 4, 1 + .5]
    fg, bg = fg_bg_representations(p, z, "none")
    torch.testing.assert_close(fg, torch.tensor([[2.5, 0.5]]))
    torch.testing.assert_close(bg, torch.tensor([[7.5, 1.5]]))
    fg, bg = fg_bg_representations(p.unsqueeze(1), z, "hw")
    torch.testing.assert_close(fg, torch.tensor([[2.5, 0.5]]) / 4)
    torch.testing.assert_close(bg, torch.tensor([[7.5, 1.5]]) / 4)
    fg, bg = fg_bg_representations(p, z.contiguous(memory_format=torch.channels_last), "mass")
    torch.testing.assert_close(fg, torch.tensor([[2.5, 0.5]]) / 1.5)
    torch.testing.assert_close(bg, torch.tensor([[7.5, 1.5]]) / 2.5)


def test_pool_norm_does_not_change_the_losses():
    torch.manual_seed(1)
    p, z = torch.rand(4, 5, 5), torch.rand(4, 6, 5, 5)
    values = []
    for norm in ("none", "hw", "mass"):
        fg, bg = fg_bg_representations(p, z, norm)
        s = cosine_matrix(fg, fg, EPS)
        values.append(torch.stack([negative_loss(cosine_matrix(fg, bg, EPS)), positive_loss(s, rank_weights(s, 0.3))]))
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], values[2])


# --------------------------------------------------------------------------- eqs. 2-3


def test_negative_loss_eq2_by_hand():
    fg = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bg = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    s = cosine_matrix(fg, bg, EPS)
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(s, torch.tensor([[r, 1 - EPS], [r, EPS]]))
    expected = -(math.log(1 - r) + math.log(EPS) + math.log(1 - r) + math.log(1 - EPS)) / 4
    assert negative_loss(s).item() == pytest.approx(expected, rel=1e-5)  # float32 1 - 0.9995


# --------------------------------------------------------------------------- eq. 5


def test_rank_weights_row_and_global_by_hand():
    s = torch.tensor([[1.0, 0.9, 0.5], [0.9, 1.0, 0.95], [0.5, 0.95, 1.0]])
    a = 0.5
    e = math.exp(-a)
    # Row scope: row 0 ranks (s01, s02) = (0, 1); row 1 (s10, s12) = (1, 0); row 2 (s20, s21) = (1, 0).
    torch.testing.assert_close(rank_weights(s, a, "row"), torch.tensor([[0, 1, e], [e, 0, 1], [e, 1, 0]]))
    # Global scope over the 6 off-diagonal values: 0.95, 0.95 (ranks 0, 1 by index), 0.9, 0.9 (2, 3),
    # 0.5, 0.5 (4, 5).
    expected = torch.tensor([[0, e**2, e**4], [e**3, 0, 1], [e**5, e, 0]])
    torch.testing.assert_close(rank_weights(s, a, "global"), expected)


@pytest.mark.parametrize("scope", ["row", "global"])
def test_rank_weights_are_in_0_1_and_all_one_at_alpha_zero(scope):
    torch.manual_seed(2)
    s = cosine_matrix(torch.rand(7, 4), torch.rand(7, 4), EPS)
    off = ~torch.eye(7, dtype=torch.bool)
    for alpha in (0.05, 0.75, 5.0):
        w = rank_weights(s, alpha, scope)
        assert ((w >= 0) & (w <= 1)).all() and (w[~off] == 0).all()
        assert w.max() == 1 and w.requires_grad is False  # the most similar pair has rank 0
        if scope == "row":
            assert (w.max(dim=1).values == 1).all()
    w0 = rank_weights(s, 0.0, scope)
    assert (w0[off] == 1).all() and (w0[~off] == 0).all()


# --------------------------------------------------------------------------- eqs. 4, 6-8


def _naive_positive(vectors: list[list[float]], alpha: float) -> float:
    """Eqs. 4, 5 (row ranks), 7 written out with Python loops."""
    n = len(vectors)
    total = 0.0
    for i in range(n):
        sims = {j: _clamp(_cos(vectors[i], vectors[j])) for j in range(n) if j != i}
        ordered = sorted(sims, key=lambda j: -sims[j])
        for rank, j in enumerate(ordered):
            total += math.exp(-alpha * rank) * math.log(sims[j])
    return -total / (n * (n - 1))


def test_positive_loss_eq7_three_images_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    s12, s13, s23 = 1 / math.sqrt(2), 1 / math.sqrt(10), 4 / math.sqrt(20)
    a = 0.5
    e = math.exp(-a)
    # Row 1: s12 > s13; row 2: s23 > s21; row 3: s32 > s31.
    expected = (
        -(math.log(s12) + e * math.log(s13) + e * math.log(s12) + math.log(s23) + e * math.log(s13) + math.log(s23)) / 6
    )
    s = cosine_matrix(v, v, EPS)
    assert positive_loss(s, rank_weights(s, a, "row")).item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0: the plain mean of -log s over the 6 ordered pairs.
    plain = -2 * (math.log(s12) + math.log(s13) + math.log(s23)) / 6
    assert positive_loss(s, rank_weights(s, 0.0, "row")).item() == pytest.approx(plain, rel=1e-6)


def test_positive_loss_batch_of_one_is_zero():
    s = cosine_matrix(torch.rand(1, 3), torch.rand(1, 3), EPS)
    assert positive_loss(s, rank_weights(s, 0.1)).item() == 0.0


def test_total_eq9_equals_independent_computation():
    model = _model(alpha=0.3).eval()
    images = torch.randn(3, 3, 64, 64)
    out = model(images)
    terms = model.losses(out, _batch(images))
    assert set(terms) == {"neg", "pos_fg", "pos_bg", "cls"}
    fg, bg = out["fg"].tolist(), out["bg"].tolist()
    neg = -sum(math.log(1 - _clamp(_cos(f, b))) for f in fg for b in bg) / 9
    total = neg + _naive_positive(fg, 0.3) + _naive_positive(bg, 0.3)
    contrastive = terms["neg"] + terms["pos_fg"] + terms["pos_bg"]
    assert contrastive.item() == pytest.approx(total, rel=1e-5)
    assert terms["neg"].item() == pytest.approx(neg, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.05, 0.75])
def test_the_released_reduction_is_ours_over_all_n2_entries(alpha):
    """CVI-SZU/CCAM's SimMaxLoss / SimMinLoss were run beside ours on 40 random batches
    (benchmarks/results/ccam_losses.json, worst relative difference 1.9e-7): the negative term is
    the same, and each positive term is ours rescaled to a mean over all n^2 entries, the diagonal
    included (its s clamped to 1 - 5e-4; ranked first in its row, so rank -1 after the released
    shift and weight exp(alpha)). This restates that reduction in the test's own words."""
    torch.manual_seed(1)
    n = 6
    fg, bg = torch.rand(n, 32), torch.rand(n, 32)
    ours = contrastive_terms(fg, bg, C2AMConfig(alpha=alpha))
    eps = C2AMConfig().sim_eps
    for name, v in (("pos_fg", fg), ("pos_bg", bg)):
        sim = cosine_matrix(v, v, eps)
        rank_with_diagonal = torch.argsort(torch.argsort(sim, dim=1, descending=True), dim=1) - 1
        released = (torch.exp(-alpha * rank_with_diagonal.float()) * -torch.log(sim)).mean()
        assert torch.diagonal(rank_with_diagonal).eq(-1).all()
        diagonal = -math.log(1 - eps) * math.exp(alpha) / n
        assert released.item() == pytest.approx(ours[name].item() * (n - 1) / n + diagonal, rel=1e-5)
    released_neg = -torch.log(1 - cosine_matrix(bg, fg, eps)).mean()
    assert released_neg.item() == pytest.approx(ours["neg"].item(), rel=1e-6)


def test_term_weights_scale_and_drop_terms():
    images = torch.randn(3, 3, 64, 64)
    base = _model().eval()
    ref = base.losses(base(images), _batch(images))
    model = _model(neg_weight=2.0, pos_bg_weight=0.0, probe_classifier=False).eval()
    terms = model.losses(model(images), _batch(images))
    assert set(terms) == {"neg", "pos_fg"}
    torch.testing.assert_close(terms["neg"], 2 * ref["neg"])
    torch.testing.assert_close(terms["pos_fg"], ref["pos_fg"])


# --------------------------------------------------------------------------- orientation


def _blob_maps(n: int = 3, side: int = 14) -> torch.Tensor:
    maps = torch.full((n, side, side), 0.1)
    maps[:, 4:10, 3:11] = 0.9
    return maps


def test_border_fraction_by_hand():
    m = torch.zeros(1, 4, 4)
    m[0, 0, :] = 1.0  # the top row on: (top 1 + bottom 0 + left 1/4 + right 1/4) / 4
    assert border_foreground_fraction(m).item() == pytest.approx(1.5 / 4)
    m = torch.zeros(1, 6, 6)
    m[0, 1, 1] = 0.6  # > 0.5 and inside a 2-pixel border: top rows 1/12, left columns 1/12
    assert border_foreground_fraction(m, border=2).item() == pytest.approx((1 / 12 + 1 / 12) / 4)


def test_orientation_flips_an_inverted_map_and_not_a_proper_one():
    proper = _model(orientation_check="step")
    assert proper.orientation_due(299) is False and proper.orientation_due(300) is True
    assert proper.calibrate_orientation(_blob_maps()) == 1.0
    assert proper.orientation.item() == 1.0 and proper.orientation_due(10_000) is False

    inverted = _model()
    assert inverted.calibrate_orientation(1 - _blob_maps()) == -1.0
    assert inverted.orientation.item() == -1.0 and bool(inverted.orientation_calibrated)
    # One-time: a later call is a no-op unless forced.
    assert inverted.calibrate_orientation(_blob_maps()) == -1.0
    assert inverted.calibrate_orientation(_blob_maps(), force=True) == 1.0


def test_inference_applies_the_orientation():
    model = _model().eval()
    images = torch.randn(2, 3, 64, 64)
    raw = model.raw_maps(images)
    torch.testing.assert_close(model.inference(images).maps, raw)
    model.calibrate_orientation(torch.ones(2, 8, 8))  # border all on: flip
    torch.testing.assert_close(model.inference(images).maps, 1 - raw)
    torch.testing.assert_close(model.localization_maps(images), 1 - raw)


def test_both_orientations_are_offered_for_scoring_whichever_was_chosen():
    model = _model().eval()
    images = torch.randn(2, 3, 64, 64)
    raw = model.raw_maps(images)
    for flip in (False, True):
        if flip:
            model.calibrate_orientation(torch.ones(2, 8, 8))  # border all on: flip
        variants = model.inference_variants(images)
        assert set(variants) == {"p", "one_minus_p"}
        torch.testing.assert_close(variants["p"], raw)
        torch.testing.assert_close(variants["one_minus_p"], 1 - raw)
        chosen = "one_minus_p" if flip else "p"
        torch.testing.assert_close(model.inference(images).maps, variants[chosen])


def test_evaluation_scores_the_rejected_orientation_beside_the_chosen_one(monkeypatch):
    """A head whose P is the object, scored with either orientation: each run logs the other
    side's score under its name (``maxboxacc_v2_map_p`` / ``_one_minus_p``)."""
    from wsol_core.config import EvalConfig
    from wsol_core.train.evaluate import evaluate_split

    def object_blob(features: torch.Tensor) -> torch.Tensor:  # P: 0.9 on the box's cells, 0.1 elsewhere
        maps = torch.full((features.shape[0], 8, 8), 0.1)
        maps[:, :4, :4] = 0.9
        return maps

    batch = dataclasses.replace(
        _batch(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long)),
        boxes=torch.tensor([[[0.0, 0.0, 31.0, 31.0]]] * 4),  # cells 0-3 of 8 on a 64 px image
        num_boxes=torch.ones(4, dtype=torch.long),
    )
    scored = {}
    for orientation in (1.0, -1.0):
        model = _model().eval()
        monkeypatch.setattr(model, "_activation", object_blob)
        model.calibrate_orientation(_blob_maps() if orientation > 0 else torch.ones(2, 8, 8))
        assert model.orientation.item() == orientation
        evaluation = EvalConfig(num_vis_images=0, mask_stat_images=0)
        scored[orientation] = evaluate_split(model, [batch], evaluation, split="val").metrics
    right, wrong = scored[1.0], scored[-1.0]  # P is the object, so +1 is the right call
    assert right["val/maxboxacc_v2"] == pytest.approx(100.0)
    assert wrong["val/maxboxacc_v2"] < right["val/maxboxacc_v2"]  # 1 - P: a frame around the object
    for metrics in (right, wrong):  # both sides in every run, whichever was chosen
        assert metrics["val/maxboxacc_v2_map_p"] == pytest.approx(right["val/maxboxacc_v2"])
        assert metrics["val/maxboxacc_v2_map_one_minus_p"] == pytest.approx(wrong["val/maxboxacc_v2"])


def test_orientation_persists_through_state_dict_round_trip(tmp_path):
    model = _model()
    model.calibrate_orientation(1 - _blob_maps())
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    resumed = _model(orientation_check="step")
    assert resumed.orientation_due(10_000) is True
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.orientation.item() == -1.0
    assert resumed.orientation_due(10_000) is False and resumed.orientation_due(0, evaluating=True) is False
    assert resumed.calibrate_orientation(_blob_maps()) == -1.0  # still the resumed decision


def test_orientation_is_all_reduced_under_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _model()
        assert model.calibrate_orientation(1 - _blob_maps()) == -1.0
    finally:
        dist.destroy_process_group()


def test_epoch_end_mode_decides_on_the_first_epochs_last_step_image_zero():
    """The released scripts: last iteration of epoch 0, ``check_positive`` on image 0 only."""
    model = _model()  # defaults: orientation_check = "epoch_end", orientation_images = 1
    maps = _blob_maps(3)
    maps[0] = 1 - maps[0]  # image 0 inverted, the others proper: image 0 alone decides
    model.after_step(1, {"raw_maps": _blob_maps(3)})
    model.after_step(2, {"raw_maps": maps})  # the epoch's last step
    assert not model._calibrated  # nothing decided before the epoch ends
    model.after_epoch(1)
    assert model.orientation.item() == -1.0 and bool(model.orientation_calibrated)
    model.after_step(3, {"raw_maps": _blob_maps(3)})
    model.after_epoch(2)
    assert model.orientation.item() == -1.0  # once only
    voting = _model(orientation_images=0)  # every image votes: 1 of 3 inverted -> keep P
    voting.after_step(1, {"raw_maps": maps})
    voting.after_epoch(1)
    assert voting.orientation.item() == 1.0


def test_first_eval_mode_waits_for_evaluation():
    model = _model(orientation_check="first_eval")
    assert model.orientation_due(10**9) is False
    assert model.orientation_due(5, evaluating=True) is True


# --------------------------------------------------------------------------- probe and labels


def test_unlabeled_batch_trains():
    model = _model()
    images = torch.randn(4, 3, 64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        terms = model.losses(model(images), _batch(images))
        assert terms["cls"].item() == 0.0
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_probe_loss_masks_unlabeled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labels = torch.tensor([0, -1, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(-5) / (math.exp(5) + math.exp(-5)))) / 2
    assert probe_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_probe_does_not_change_maps():
    with_probe = _model(probe_classifier=True)
    without = _model(probe_classifier=False)
    without.load_state_dict({k: v for k, v in with_probe.state_dict().items() if not k.startswith("probe.")})
    images = torch.randn(3, 3, 64, 64)
    labels = torch.tensor([0, 4, -1])
    # Training forward: identical maps and representations; the probe's loss reaches only the probe.
    out_a, out_b = with_probe(images, labels), without(images)
    torch.testing.assert_close(out_a["raw_maps"], out_b["raw_maps"])
    torch.testing.assert_close(out_a["fg"], out_b["fg"])
    with_probe.losses(out_a, _batch(images, labels))["cls"].backward()
    for name, param in with_probe.named_parameters():
        if name.startswith("probe."):
            assert param.grad is not None and param.grad.abs().sum() > 0
        else:
            assert param.grad is None or param.grad.abs().sum() == 0, name
    with_probe.eval(), without.eval()
    a, b = with_probe.inference(images), without.inference(images)
    torch.testing.assert_close(a.maps, b.maps)
    assert a.logits.shape == (3, 5) and b.logits is None


# --------------------------------------------------------------------------- gradients, shapes, precision


@pytest.mark.parametrize("method", [{}, {"concat_stage": "block3"}, {"official_param_groups": True}])
def test_gradients_reach_every_trainable_parameter(method):
    model = _model(**method)
    images = torch.randn(4, 3, 64, 64)
    terms = model.losses(model(images), _batch(images, torch.tensor([0, 1, -1, 3])))
    sum(terms.values()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    if method.get("official_param_groups"):
        assert not model.bn_head.weight.requires_grad and not model.backbone.block1[1].weight.requires_grad


def test_param_groups():
    official = _model(official_param_groups=True)
    groups = {g["name"]: g for g in official.param_groups(1e-4, 10.0)}
    head = {id(p) for p in groups["head"]["params"]}
    trunk = {id(p) for p in groups["trunk"]["params"]}
    assert groups["head"]["lr"] == pytest.approx(1e-3) and groups["trunk"]["lr"] == pytest.approx(1e-4)
    # The released code as it runs (CVI-SZU/CCAM, run on 2026-12-02): its get_parameter_groups
    # puts the activation head's conv in the backbone's group, so the whole encoder (its head stage
    # included) and the activation head learn at lr; only the project's probe is at 10x.
    assert id(official.activation_head.weight) in trunk and id(official.backbone.conv6[0].weight) in trunk
    assert head == {id(p) for p in official.probe.parameters()}
    assert not trunk & head and len(trunk) + len(head) == sum(p.requires_grad for p in official.parameters())
    # BatchNorm affine parameters are in no group (the released groups take conv weights only).
    assert id(official.bn_head.weight) not in trunk | head
    without_probe = _model(official_param_groups=True, probe_classifier=False)
    groups = {g["name"]: g for g in without_probe.param_groups(1e-4, 10.0)}
    assert groups["head"]["params"] == [] and id(without_probe.activation_head.weight) in {
        id(p) for p in groups["trunk"]["params"]
    }
    protocol = _model()
    head = {id(p) for p in {g["name"]: g for g in protocol.param_groups(1e-4, 10.0)}["head"]["params"]}
    assert id(protocol.backbone.conv6[0].weight) in head and id(protocol.bn_head.weight) in head
    assert id(protocol.backbone.block1[0].weight) not in head


@pytest.mark.parametrize("preset", ["c2am_resnet50_cub", "c2am_resnet50_imagenet"])
def test_the_presets_optimizer_matches_the_released_groups_as_they_run(preset):
    """CVI-SZU/CCAM's get_parameter_groups + PolyOptimizer, run on 2026-12-02
    (benchmarks/results/ccam_param_groups.json): 54 conv weights at lr (ResNet50's 53 and the
    activation head's), nothing in the 2x / 10x / 20x groups, BatchNorm affine in no group, SGD
    momentum 1e-4. The project's optimizer built from the preset must give the encoder and the
    activation head the same: the same 54 tensors, all at lr."""
    from wsol_core.train.optim import build_optimizer

    cfg = load_config([preset], ["model.pretrained="])  # no download: the groups need no weights
    method = build_method(cfg, num_classes=10)
    optimizer = build_optimizer(method, cfg.optim, torch.device("cpu"))
    probe = {id(p) for p in method.probe.parameters()}
    at_lr = [p for g in optimizer.param_groups if g["lr"] == cfg.optim.lr for p in g["params"]]
    others = [p for g in optimizer.param_groups if g["lr"] != cfg.optim.lr for p in g["params"]]
    assert len(at_lr) == 54 and all(p.dim() == 4 for p in at_lr)
    assert any(p is method.activation_head.weight for p in at_lr)
    assert {id(p) for p in others} == probe  # only the project's probe learns at head_lr_mult
    assert all(g["momentum"] == pytest.approx(1e-4) for g in optimizer.param_groups)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    batchnorm = [p for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert len(batchnorm) == 106 + 2 and not in_optimizer & {id(p) for p in batchnorm}


@pytest.mark.parametrize(
    ("backbone", "size", "large", "side"),
    [
        ("tiny", 112, False, 14),
        ("tiny", 112, True, 28),
        ("vgg16", 224, False, 14),
        ("resnet50", 224, False, 14),
        ("inception_v3", 224, False, 14),
    ],
)
def test_shapes(backbone, size, large, side):
    torch.manual_seed(0)
    model = C2AM(build_backbone(backbone, large_feature_map=large), 7, _cfg())
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():  # one forward + losses; gradients are tested on the tiny backbone
        out = model(images)
        terms = model.losses(out, _batch(images))
    channels = model.backbone.out_channels
    assert (
        out["raw_maps"].shape == (2, side, side) and out["fg"].shape == (2, channels) and out["logits"].shape == (2, 7)
    )
    assert set(terms) == {"neg", "pos_fg", "pos_bg", "cls"}
    assert all(t.shape == () and torch.isfinite(t) for t in terms.values())
    if backbone == "tiny":  # the inference path is the same code on every backbone
        model.eval()
        result = model.inference(images)
        assert result.maps.shape == (2, side, side) and result.logits.shape == (2, 7)
        assert ((result.maps >= 0) & (result.maps <= 1)).all()


def test_resnet50_concat_layer3_channels():
    model = C2AM(build_backbone("resnet50"), 3, _cfg(concat_stage="layer3"))
    assert model.activation_head.in_channels == 2048 + 1024


def test_concat_stage_at_higher_resolution_is_pooled():
    model = _model(concat_stage="block3")  # block3 is 2x the final resolution on tiny
    out = model(torch.randn(2, 3, 64, 64))
    assert out["raw_maps"].shape == (2, 8, 8) and out["fg"].shape == (2, 256 + 128)


def test_bad_concat_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="no stage 'layer3'"):
        _model(concat_stage="layer3")  # a ResNet stage on the tiny backbone
    with pytest.raises(ValueError, match="final stage"):
        _model(concat_stage="conv6")


def test_bf16_autocast_and_channels_last():
    model = _model().to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        terms = model.losses(out, _batch(images, torch.tensor([0, 1, 2, -1])))
    assert out["fg"].dtype == torch.float32 and out["raw_maps"].dtype == torch.float32
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    sum(terms.values()).backward()
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = model.localization_maps(images)
    assert maps.shape == (4, 8, 8) and torch.isfinite(maps).all()


def test_head_init_options_build():
    for scheme in ("default", "kaiming_normal", "kaiming_uniform", "normal", "uniform", "xavier_uniform"):
        model = _model(head_init=scheme)
        assert torch.isfinite(model.activation_head.weight).all()


# --------------------------------------------------------------------------- smoke fit


def _toy_images(n: int = 8, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured background with one differently coloured square object per image, and the
    objects' masks."""
    g = torch.Generator().manual_seed(0)
    images = 0.3 * torch.randn(n, 3, size, size, generator=g) + torch.tensor([-1.0, 0.5, -0.5]).view(1, 3, 1, 1)
    masks = torch.zeros(n, size, size)
    for i in range(n):
        side = int(torch.randint(size // 3, size // 2, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(4, size - side - 4, (2,), generator=g))
        images[i, :, y0 : y0 + side, x0 : x0 + side] = 0.3 * torch.randn(3, side, side, generator=g) + torch.tensor(
            [1.0, -0.5, 1.0]
        ).view(3, 1, 1)
        masks[i, y0 : y0 + side, x0 : x0 + side] = 1.0
    return images, masks


def test_smoke_fit_30_sgd_steps():
    cfg = load_config(base={"method": {"name": "c2am"}, "model": {"backbone": "tiny"}})
    torch.manual_seed(0)
    model = build_method(cfg, 5)
    images, masks = _toy_images()
    batch = _batch(images)
    opt = torch.optim.SGD(model.param_groups(0.01, 10.0), lr=0.01, momentum=0.9)
    history = []
    for step in range(30):
        outputs = model(images)
        loss = sum(model.losses(outputs, batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        if model.orientation_due(step):  # never within 30 steps (check at 300)
            model.calibrate_orientation(outputs["raw_maps"])
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    model.eval()
    assert model.orientation_due(30, evaluating=True)  # the first evaluation decides
    model.calibrate_orientation(model.raw_maps(images))
    maps = model.localization_maps(images)
    assert torch.isfinite(maps).all()
    # Oriented, the map is higher on the objects than on the background (on average: 30 steps do
    # not always separate every image).
    object_mask = torch.nn.functional.adaptive_avg_pool2d(masks[:, None], maps.shape[-2:])[:, 0] > 0.5
    inside = (maps * object_mask).sum((1, 2)) / object_mask.sum((1, 2))
    outside = (maps * ~object_mask).sum((1, 2)) / (~object_mask).sum((1, 2))
    assert inside.mean() > outside.mean() + 0.1, (inside, outside)


# --------------------------------------------------------------------------- config


def test_presets_load():
    for name in ("c2am_resnet50_cub", "c2am_resnet50_imagenet"):
        cfg = load_config([name])
        assert cfg.method.name == "c2am" and cfg.model.backbone == "resnet50"
        assert cfg.method.alpha == 0.05 and cfg.optim.lr == 1e-4 and cfg.method.concat_stage == "layer3"
    assert load_config(["c2am_resnet50_cub"]).data.batch_size == 16
    assert load_config(["c2am_resnet50_imagenet"]).data.batch_size == 256


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("method.alpha=-0.1", "method.alpha = -0.1"),
        ("method.sim_eps=0.5", "method.sim_eps"),
        ("method.sim_eps=0", "method.sim_eps"),
        ("method.orientation_threshold=1.0", "method.orientation_threshold"),
        ("method.orientation_border=0", "method.orientation_border"),
        ("method.orientation_check_step=-1", "method.orientation_check_step"),
        ("method.rank_scope=column", "method.rank_scope"),
        ("method.orientation_check=never", "method.orientation_check"),
        ("method.head_init=zeros", "method.head_init"),
        ("method.neg_weight=-1", "method.neg_weight"),
    ],
)
def test_bad_config_fails_at_load(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(base={"method": {"name": "c2am"}}, overrides=[override])


def test_all_terms_off_fails_at_load():
    with pytest.raises(ConfigError, match=r"method\.neg_weight.*all 0"):
        load_config(
            base={"method": {"name": "c2am"}},
            overrides=["method.neg_weight=0", "method.pos_fg_weight=0", "method.pos_bg_weight=0"],
        )
