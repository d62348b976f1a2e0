"""CAML (Ki et al., ICCV 2021): PTAP (eq. 1-2), the contrastive attention map loss (eq. 3-4), the
pretext transforms and their inverses, the detached probe, shapes, training and config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsol_core.config import ConfigError, load_config
from wsol_core.data.batch import Batch
from wsol_core.methods import build_method, method_class
from wsol_core.methods.caml import (
    CAML,
    ECA,
    background_mask,
    caml_loss,
    eca_kernel_size,
    l2_distance,
    ptap,
    ptap_k,
    triplet_hinge,
)
from wsol_core.methods.pretext import Flip, Rotation, Scale, Translation, apply_ops, invert_ops
from wsol_core.models import TinyCNN

T5 = "method.pretext.transforms=[rotation,scale,translation,hflip,vflip]"


def _cfg(overrides=(), backbone="tiny", large=False):
    return load_config(
        base={"method": {"name": "caml"}, "model": {"backbone": backbone, "large_feature_map": large}},
        overrides=list(overrides),
    )


def _build(overrides=(), backbone="tiny", num_classes=5, large=False, seed=0) -> CAML:
    torch.manual_seed(seed)
    return build_method(_cfg(overrides, backbone, large), num_classes)


def _batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    b = images.shape[0]
    return Batch(
        images=images,
        labels=labels,
        keys=[str(i) for i in range(b)],
        orig_sizes=torch.full((b, 2), images.shape[-1]),
        boxes=torch.zeros(b, 1, 4),
        num_boxes=torch.ones(b, dtype=torch.long),
    )


def _blob(n: int, side: int, sigma: float = 0.18) -> torch.Tensor:
    """Smooth Gaussian blobs ``[n, 1, side, side]`` at different centres inside the map."""
    coords = (torch.arange(side) + 0.5) / side * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = torch.linspace(-0.3, 0.3, n)
    maps = [torch.exp(-((xx - c) ** 2 + (yy + c / 2) ** 2) / (2 * sigma**2)) for c in centres]
    return torch.stack(maps).unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# PTAP (eq. 1-2)
# ---------------------------------------------------------------------------------------------


def test_ptap_all_channels_is_average_pooling_and_one_is_max_pooling():
    f = torch.randn(3, 16, 5, 4)
    torch.testing.assert_close(ptap(f, 16), f.mean(dim=1))
    torch.testing.assert_close(ptap(f, 1), f.amax(dim=1))
    torch.testing.assert_close(ptap(f, 1, "bottom"), f.amin(dim=1))
    torch.testing.assert_close(ptap(f, 16, "bottom"), f.mean(dim=1))


@pytest.mark.parametrize("k", [1, 3, 8, 11, 15])
@pytest.mark.parametrize("select", ["top", "bottom"])
def test_ptap_matches_a_sorted_reference_in_value_and_gradient(k, select):
    f = torch.randn(2, 16, 3, 3, requires_grad=True)
    ref_in = f.detach().clone().requires_grad_(True)
    ordered = ref_in.sort(dim=1, descending=(select == "top")).values
    reference = ordered[:, :k].mean(dim=1)
    out = ptap(f, k, select)
    torch.testing.assert_close(out, reference)
    weights = torch.randn_like(reference)
    (out * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(f.grad, ref_in.grad)


def test_ptap_k_from_ratio():
    assert ptap_k(512, 0.7) == 358  # round(358.4)
    assert ptap_k(512, 1.0) == 512
    assert ptap_k(512, 1e-6) == 1
    assert ptap_k(1024, 0.3) == 307


def test_method_maps_are_average_or_max_pooling_with_eca_off():
    x = torch.randn(2, 3, 112, 112)
    avg = _build(["method.ptap.eca=false", "method.ptap.k_ratio=1.0"]).eval()
    feats = avg.backbone(x)
    torch.testing.assert_close(avg.inference(x).maps, feats.mean(dim=1))
    mx = _build(["method.ptap.eca=false", "method.ptap.k_ratio=0.000001"]).eval()
    torch.testing.assert_close(mx.inference(x).maps, mx.backbone(x).amax(dim=1))


def test_method_maps_with_eca_weights_fixed():
    """Zero Conv1D weights: sigma(0) = 1/2 on every channel, so F_w = F_x / 2 (eq. 1)."""
    x = torch.randn(2, 3, 112, 112)
    model = _build(["method.ptap.k_ratio=1.0"]).eval()
    torch.nn.init.zeros_(model.eca.conv.weight)
    torch.testing.assert_close(model.inference(x).maps, 0.5 * model.backbone(x).mean(dim=1))


@pytest.mark.parametrize(
    ("channels", "expected"),
    [(64, 3), (128, 5), (256, 5), (512, 5), (1024, 5), (2048, 7)],
)
def test_eca_adaptive_kernel_size(channels, expected):
    # |log2(C)/2 + 1/2|_odd: e.g. C = 2048 -> (11 + 1) / 2 = 6 -> nearest odd above: 7.
    assert eca_kernel_size(channels) == expected


def test_eca_module_kernel_and_forward():
    assert _build().eca.kernel_size == 5  # tiny: 256 channels
    assert _build(["method.ptap.eca_kernel=3"]).eca.kernel_size == 3
    eca = ECA(4, kernel_size=3)
    with torch.no_grad():
        eca.conv.weight.copy_(torch.tensor([[[1.0, 0.0, 2.0]]]))
    f = torch.randn(2, 4, 3, 3)
    gap = f.mean(dim=(2, 3))
    padded = F.pad(gap, (1, 1))
    conv = padded[:, :-2] * 1.0 + padded[:, 2:] * 2.0  # channel c: gap[c-1] + 2 gap[c+1]
    weighted, weights = eca(f)
    torch.testing.assert_close(weights, torch.sigmoid(conv))
    torch.testing.assert_close(weighted, f * torch.sigmoid(conv)[:, :, None, None])


# ---------------------------------------------------------------------------------------------
# Eq. 3-4
# ---------------------------------------------------------------------------------------------


def test_background_mask_is_theta_times_min_of_reverse_map():
    a = torch.tensor([[[0.8, 0.55], [0.53, 0.0]]])
    # 1 - A = [[.2, .45], [.47, 1]], min .2: theta = 2.3 * .2 = .46 -> only .47 and 1 pass.
    assert background_mask(a, 2.3).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    # theta_bg 2.0: theta = .4 -> .45 passes too.
    assert background_mask(a, 2.0).tolist() == [[[0.0, 1.0], [1.0, 1.0]]]
    # Sec. 4's wording: A < 2.3 * min(A) = .23.
    b = torch.tensor([[[0.1, 0.2], [0.3, 0.5]]])
    assert background_mask(b, 2.3, "map_min").tolist() == [[[1.0, 1.0], [0.0, 0.0]]]


def _hand_case():
    a_ori = torch.tensor([[[0.9, 0.5], [0.2, 0.6]], [[0.99, 0.99], [0.1, 0.1]]])
    a_trans = torch.tensor([[[0.3, 0.8], [0.4, 0.1]], [[0.99, 0.99], [0.1, 0.1]]])
    a_trans2ori = torch.tensor([[[0.7, 0.5], [0.2, 0.4]], [[0.99, 0.99], [0.1, 0.1]]])
    a_ori2trans = torch.tensor([[[0.3, 0.9], [0.4, 0.1]], [[0.99, 0.99], [0.1, 0.1]]])
    return a_ori, a_trans, a_trans2ori, a_ori2trans


def test_caml_loss_hand_computed():
    """Sample 1: 1 - A_ori = [[.1,.5],[.8,.4]], theta = .23 -> A_ori2bg = [[0,.5],[.2,.6]];
    1 - A_trans = [[.7,.2],[.6,.9]], theta = .46 -> A_trans2bg = [[.3,0],[.4,.1]].
    d(a1, p1) = sqrt(.2^2 + .2^2) = .282843, d(a1, n1) = sqrt(.7^2 + .2^2) = .728011;
    d(a2, p2) = .1, d(a2, n2) = .9. Hinges: .554832 and .2.
    Sample 2: anchors equal positives (d = 0), background = bottom row, d(a, n) =
    sqrt(2 * .99^2) = 1.400071 > 1: both hinges 0. Mean: (.554832 + .2 + 0) / 2."""
    a_ori, a_trans, a_trans2ori, a_ori2trans = _hand_case()
    first = math.sqrt(0.08) - math.sqrt(0.53) + 1.0
    expected = (first + 0.2) / 2
    rule = {"bg_rule": "reverse_min"}  # eq. 3 as printed (the hand case is built for it)
    loss = caml_loss(a_ori, a_trans, a_trans2ori, a_ori2trans, margin=1.0, theta_bg=2.3, **rule)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # Table 5 variants: positives only (L2) / negatives only ([m - d(a, n)]_+).
    pos = caml_loss(a_ori, a_trans, a_trans2ori, a_ori2trans, pairs="pos", **rule)
    assert pos.item() == pytest.approx((math.sqrt(0.08) + 0.1) / 2, abs=1e-5)
    neg = caml_loss(a_ori, a_trans, a_trans2ori, a_ori2trans, pairs="neg", **rule)
    assert neg.item() == pytest.approx((1 - math.sqrt(0.53) + 1 - 0.9 + 0.0) / 2, abs=1e-5)
    # The margin moves the first sample's hinges one for one.
    half = caml_loss(a_ori, a_trans, a_trans2ori, a_ori2trans, margin=0.5, **rule)
    assert half.item() == pytest.approx((first - 0.5 + max(0.2 - 0.5, 0.0)) / 2, abs=1e-5)


def test_l2_distance_and_hinge_are_finite_at_zero_distance():
    a = torch.rand(2, 1, 3, 3, requires_grad=True)
    d = l2_distance(a, a.detach())
    assert torch.all(d < 1e-5)
    triplet_hinge(a, a.detach(), torch.zeros_like(a), 1.0).sum().backward()
    assert torch.isfinite(a.grad).all()
    weight = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    x, y = torch.zeros(1, 1, 1, 3), torch.tensor([[[[3.0, 100.0, 4.0]]]])
    assert l2_distance(x, y, weight).item() == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------
# Pretext transforms
# ---------------------------------------------------------------------------------------------


def test_rotation_matches_rot90_per_sample_and_inverts_exactly():
    x = torch.randn(4, 2, 6, 6)
    labels = torch.tensor([0, 1, 2, 3])
    rot = Rotation()
    out = rot.forward(x, labels)
    for i in range(4):
        assert torch.equal(out[i], torch.rot90(x[i], i, dims=(-2, -1)))
    assert torch.equal(rot.inverse(out, labels), x)
    with pytest.raises(ValueError, match="square"):
        rot.forward(torch.randn(1, 1, 4, 6), torch.tensor([1]))


@pytest.mark.parametrize(("name", "dim"), [("hflip", -1), ("vflip", -2)])
def test_flips_invert_exactly(name, dim):
    x = torch.randn(2, 3, 5, 7)
    labels = torch.tensor([1, 0])
    flip = Flip(name, dim)
    out = flip.forward(x, labels)
    assert torch.equal(out[0], x[0].flip(dim)) and torch.equal(out[1], x[1])
    assert torch.equal(flip.inverse(out, labels), x)


def test_scale_magnifies_about_the_centre():
    """Factor 2 on a horizontal ramp r(u) = u (normalized coords): output(u) = input(u / 2)."""
    side = 16
    u = (torch.arange(side) + 0.5) / side * 2 - 1
    ramp = u.view(1, 1, 1, side).expand(1, 1, side, side).contiguous()
    out = Scale((1.0, 2.0)).forward(ramp, torch.tensor([1]))
    torch.testing.assert_close(out[0, 0, 5], u / 2, atol=1e-5, rtol=0)
    assert torch.equal(Scale((1.0, 2.0)).forward(ramp, torch.tensor([0])), ramp)  # identity class


@pytest.mark.parametrize("factor", [1 / 1.3, 1 / 0.7, 0.5, 1.5])
def test_scale_inverse_recovers_maps_approximately(factor):
    maps = _blob(3, 28, sigma=0.3)
    scale = Scale((1.0, factor))
    labels = torch.ones(3, dtype=torch.long)
    back = scale.inverse(scale.forward(maps, labels), labels)
    if factor > 1:  # zoom in: only the central 1/factor of the map survives
        side = 28
        keep = int(side / factor) - 4
        lo = (side - keep) // 2
        region = (slice(None), slice(None), slice(lo, lo + keep), slice(lo, lo + keep))
    else:  # shrink (reflection fill): everything survives
        region = (slice(None),) * 4
    torch.testing.assert_close(back[region], maps[region], atol=0.06, rtol=0)


def test_translation_moves_content_with_zero_fill_and_inverts_exactly_on_the_valid_region():
    x = torch.randn(5, 2, 28, 28)
    labels = torch.arange(5)  # identity, right, left, down, up by 7 px
    t = Translation(0.25)
    out = t.forward(x, labels)
    s = 7
    expected = torch.zeros_like(x)
    expected[0] = x[0]
    expected[1, :, :, s:] = x[1, :, :, :-s]
    expected[2, :, :, :-s] = x[2, :, :, s:]
    expected[3, :, s:, :] = x[3, :, :-s, :]
    expected[4, :, :-s, :] = x[4, :, s:, :]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    back = t.inverse(out, labels)
    valid = t.inverse(t.forward(torch.ones_like(x), labels), labels)
    torch.testing.assert_close(back * valid, x * valid, atol=1e-4, rtol=0)
    # "right": the rightmost s columns of the original leave the transformed image.
    assert valid[1, :, :, -s:].abs().max() < 1e-5 and (valid[1, :, :, :-s] - 1).abs().max() < 1e-5


def test_translation_of_14x14_maps_inverts_approximately():
    maps = _blob(4, 14, sigma=0.3)
    t = Translation(0.25)  # 3.5 cells: bilinear
    labels = torch.tensor([1, 2, 3, 4])
    back = t.inverse(t.forward(maps, labels), labels)
    torch.testing.assert_close(back[:, :, 5:9, 5:9], maps[:, :, 5:9, 5:9], atol=0.06, rtol=0)


def test_composed_transforms_invert_in_reverse_order():
    x = torch.randn(4, 1, 28, 28)
    ops = [
        (Rotation(), torch.tensor([1, 2, 3, 0])),
        (Flip("hflip", -1), torch.tensor([1, 1, 0, 0])),
        (Translation(0.25), torch.tensor([1, 3, 0, 4])),
    ]
    back = invert_ops(apply_ops(x, ops), ops)
    valid = invert_ops(apply_ops(torch.ones_like(x), ops, "zeros"), ops)
    torch.testing.assert_close(back * valid, x * valid, atol=1e-4, rtol=0)
    assert valid.sum() > 0.5 * x.numel()


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


def _unit(maps: torch.Tensor) -> torch.Tensor:
    return maps / maps.flatten(1).norm(dim=1).view(-1, 1, 1)


def test_forward_wiring_matches_separately_computed_maps():
    """hflip, default readings: caml_a1 = T^-1(unit(A(T(x)))), caml_p1 = unit(A(x)),
    caml_a2 = T(caml_p1), negatives = positives outside 1[A < 2.3 min A]; the loss is computed
    here from those maps with plain torch, not with the module's helpers."""
    model = _build(["method.pretext.transforms=[hflip]"]).eval()
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        out = model(x)
        flip = out["pretext_labels_hflip"].bool().view(-1, 1, 1, 1)
        xt = torch.where(flip, x.flip(-1), x)
        raw_ori, raw_trans = model.inference(x).maps, model.inference(xt).maps
    a_ori, a_trans = _unit(raw_ori), _unit(raw_trans)
    f3 = flip.view(-1, 1, 1)
    a_trans2ori = torch.where(f3, a_trans.flip(-1), a_trans)
    a_ori2trans = torch.where(f3, a_ori.flip(-1), a_ori)
    torch.testing.assert_close(out["caml_p1"][:, 0], a_ori, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["caml_p2"][:, 0], a_trans, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["caml_a1"][:, 0], a_trans2ori, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["caml_a2"][:, 0], a_ori2trans, atol=1e-5, rtol=1e-4)
    bg_ori = (raw_ori < 2.3 * raw_ori.amin(dim=(1, 2), keepdim=True)).float()
    bg_trans = (raw_trans < 2.3 * raw_trans.amin(dim=(1, 2), keepdim=True)).float()
    torch.testing.assert_close(out["caml_bg_mask"], bg_ori)
    d = lambda u, v: (u - v).flatten(1).norm(dim=1)  # noqa: E731
    first = (d(a_trans2ori, a_ori) - d(a_trans2ori, a_ori * bg_ori) + 1.0).clamp_min(0)
    second = (d(a_ori2trans, a_trans) - d(a_ori2trans, a_trans * bg_trans) + 1.0).clamp_min(0)
    terms = model.losses(out, _batch(x, torch.full((4,), -1)))
    torch.testing.assert_close(terms["caml"], (first + second).mean(), atol=1e-5, rtol=1e-4)


def test_probe_never_changes_maps():
    x = torch.randn(2, 3, 112, 112)
    with_probe = _build(["method.probe_classifier=true"], seed=3).eval()
    without = _build(["method.probe_classifier=false"], seed=4).eval()
    missing = without.load_state_dict(with_probe.state_dict(), strict=False)
    assert all(k.startswith("probe.") for k in missing.unexpected_keys) and not missing.missing_keys
    a, b = with_probe.inference(x), without.inference(x)
    assert torch.equal(a.maps, b.maps)
    assert a.logits.shape == (2, 5) and b.logits is None
    # The probe's loss reaches only the probe.
    with_probe.train()
    out = with_probe(x)
    with_probe.losses(out, _batch(x, torch.tensor([1, 2])))["probe"].backward()
    for name, p in with_probe.named_parameters():
        if not name.startswith("probe."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_unlabeled_batch_trains():
    model = _build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 64, 64)
    batch = _batch(x, torch.full((4,), -1))
    for _ in range(2):
        terms = model.losses(model(x), batch)
        assert terms["probe"].item() == 0.0
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert method_class("caml").uses_labels is False


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method.caml.embedding=feature", "method.pretext.mask_undefined=true", "method.pretext.head_input=raw", T5],
        [T5, "method.pretext.views_per_step=1", "method.pretext.view_fraction=0.5"],
        [T5, "method.pretext.mode=compose", "method.caml.map_activation=none", "method.caml.bg_rule=map_min"],
    ],
)
def test_gradients_reach_every_trainable_part(overrides):
    model = _build(overrides)
    x = torch.randn(4, 3, 64, 64) * 3
    terms = model.losses(model(x), _batch(x, torch.tensor([0, 1, -1, 2])))
    sum(terms.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_views_per_step_and_view_fraction():
    model = _build([T5, "method.pretext.views_per_step=1", "method.pretext.view_fraction=0.5"])
    out = model(torch.randn(6, 3, 112, 112))
    drawn = [k for k in out if k.startswith("pretext_logits_")]
    assert len(drawn) == 1 and out[drawn[0]].shape[0] == 3
    assert out["maps"].shape == (6, 14, 14) and out["caml_a1"].shape == (3, 1, 14, 14)
    compose = _build([T5, "method.pretext.mode=compose"])
    out = compose(torch.randn(2, 3, 112, 112))
    assert sum(k.startswith("pretext_logits_") for k in out) == 5 and out["caml_a1"].shape[0] == 2


def test_ablation_switches_drop_their_parts():
    no_cls = _build(["method.cls_weight=0"])
    assert no_cls.heads is None
    x = torch.randn(2, 3, 112, 112)
    terms = no_cls.losses(no_cls(x), _batch(x, torch.tensor([0, 1])))
    assert set(terms) == {"caml", "probe"}
    no_caml = _build(["method.caml.weight=0"])
    terms = no_caml.losses(no_caml(x), _batch(x, torch.tensor([0, 1])))
    assert set(terms) == {"cls", "probe"}
    assert _build(["method.ptap.eca=false"]).eca is None
    frozen = _build(["method.caml.weight=0", "method.pretext.head_input=raw"])
    assert not any(p.requires_grad for p in frozen.eca.parameters())
    out = frozen(x)
    sum(frozen.losses(out, _batch(x, torch.tensor([0, 1]))).values()).backward()
    assert all(p.grad is not None for p in frozen.parameters() if p.requires_grad)


def test_inference_is_class_agnostic():
    model = _build().eval()
    x = torch.randn(2, 3, 112, 112)
    a = model.inference(x)
    b = model.inference(x, torch.tensor([3, 1]))
    assert torch.equal(a.maps, b.maps)
    torch.testing.assert_close(model.localization_maps(x), a.maps)


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
    model = _build(backbone=backbone, large=large)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():  # one forward + losses (gradients are tested on the tiny backbone)
        out = model(x)
        terms = model.losses(out, _batch(x, torch.tensor([0, -1])))
    assert out["maps"].shape == (2, side, side)
    assert out["pretext_logits_rotation"].shape == (2, 4)
    assert out["caml_a1"].shape == (2, 1, side, side) and out["logits"].shape == (2, 5)
    assert set(terms) == {"cls", "caml", "probe"} and all(torch.isfinite(t) for t in terms.values())
    if backbone == "tiny":
        inf = model.eval().inference(x)
        assert inf.maps.shape == (2, side, side) and inf.logits.shape == (2, 5)


def test_bf16_autocast_and_channels_last():
    model = _build().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 112, 112).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        terms = model.losses(out, _batch(x, torch.tensor([0, 1])))
    assert out["maps"].dtype == torch.float32
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _learnable_images(n: int = 8, side: int = 64) -> torch.Tensor:
    """A bright bar with a distinct 'head' block on its top end (orientation cue for rotation)."""
    g = torch.Generator().manual_seed(0)
    images = 0.2 * torch.randn(n, 3, side, side, generator=g)
    for i in range(n):
        x0 = 8 + (i * 5) % 24
        y0 = 10 + (i * 7) % 20
        images[i, :, y0 : y0 + 30, x0 : x0 + 10] += 1.5
        images[i, 0, y0 : y0 + 8, x0 : x0 + 10] += 2.0
    return images


def test_smoke_training_decreases_the_loss():
    torch.manual_seed(0)
    model = CAML(TinyCNN(width=16), 5, _cfg().method)  # the tiny backbone at half width: fast
    images = _learnable_images()
    batch = _batch(images, torch.arange(8) % 5)
    opt = torch.optim.SGD(model.param_groups(0.01, 10.0), lr=0.01, momentum=0.9)
    history, cls = [], []
    for _ in range(30):
        terms = model.losses(model(images), batch)
        loss = sum(terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        cls.append(terms["cls"].item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5
    assert sum(cls[-5:]) / 5 < sum(cls[:5]) / 5  # the rotation pretext task is learned
    model.eval()
    assert torch.isfinite(model.localization_maps(images)).all()


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.ptap.k_ratio=0", "method.ptap.k_ratio"),
        ("method.ptap.k_ratio=1.2", "method.ptap.k_ratio"),
        ("method.ptap.k_ratio=-0.5", "method.ptap.k_ratio"),
        ("method.ptap.eca_kernel=4", "method.ptap.eca_kernel"),
        ("method.ptap.select=middle", "method.ptap.select"),
        ("method.caml.theta_bg=0", "method.caml.theta_bg"),
        ("method.caml.margin=-1", "method.caml.margin"),
        ("method.caml.map_activation=softmax", "method.caml.map_activation"),
        ("method.pretext.transforms=[rotation,shear]", "method.pretext.transforms[1]"),
        ("method.pretext.transforms=[]", "method.pretext.transforms"),
        ("method.pretext.transforms=[hflip,hflip]", "method.pretext.transforms"),
        ("method.pretext.views_per_step=2", "method.pretext.views_per_step"),
        ("method.pretext.view_fraction=0", "method.pretext.view_fraction"),
        ("method.pretext.scale.factors=[1.0]", "method.pretext.scale.factors"),
        ("method.pretext.scale.factors=[1.0,-0.5]", "method.pretext.scale.factors"),
        ("method.pretext.translation.shift=1.0", "method.pretext.translation.shift"),
        ("method.cls_weight=-1", "method.cls_weight"),
    ],
)
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        _cfg([override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="method.cls_weight and method.caml.weight"):
        _cfg(["method.cls_weight=0", "method.caml.weight=0"])
    with pytest.raises(ConfigError, match="method.pretext.views_per_step"):
        _cfg([T5, "method.pretext.mode=compose", "method.pretext.views_per_step=1"])
    cfg = _cfg([T5, "method.pretext.views_per_step=1", "method.ptap.k_ratio=1.0"])
    assert cfg.method.pretext.views_per_step == 1 and cfg.method.ptap.k_ratio == 1.0


@pytest.mark.parametrize("preset", ["caml_vgg16_cub", "caml_resnet50_cub"])
def test_presets_load(preset):
    cfg = load_config([preset])
    assert cfg.method.name == "caml"
    assert cfg.method.ptap.k_ratio == 0.7 and cfg.method.caml.theta_bg == 2.3 and cfg.method.caml.margin == 1.0
    assert cfg.optim.lr == 0.001 and cfg.optim.momentum == 0.9
