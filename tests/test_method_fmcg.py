"""FMCG (wsol_core/methods/fmcg.py): SRD, CG (eq. 5 and Table 4's variants), PNL, switches,
the inference path, gradients, shapes on every backbone, bf16 autocast, a CPU smoke fit, config."""

from __future__ import annotations

import math

import pytest
import torch

from wsol_core.config import ConfigError, load_config, preset_names
from wsol_core.data.batch import Batch
from wsol_core.methods import build_method
from wsol_core.methods.components import channel_attention, drop_mask
from wsol_core.methods.fmcg import FMCG, FMCGConfig
from wsol_core.models import TinyCNN


def make_batch(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(
        images=images,
        labels=labels,
        keys=[str(i) for i in range(n)],
        orig_sizes=torch.full((n, 2), images.shape[-1]),
        boxes=torch.zeros(n, 1, 4),
        num_boxes=torch.ones(n, dtype=torch.long),
    )


def build(overrides: list[str] | None = None, backbone: str = "tiny", classes: int = 4, large: bool = False) -> FMCG:
    cfg = load_config(
        base={"method": {"name": "fmcg"}},
        overrides=[f"model.backbone={backbone}", f"model.large_feature_map={str(large).lower()}", *(overrides or [])],
    )
    torch.manual_seed(0)
    return build_method(cfg, classes)


# -- config ---------------------------------------------------------------------------------


def test_defaults_are_the_papers_vgg16_cub_values():
    cfg = load_config(base={"method": {"name": "fmcg"}}).method
    assert isinstance(cfg, FMCGConfig)
    assert (cfg.srd.theta_drop, cfg.srd.kernel_size, cfg.cg.tau_fg, cfg.cg.tau_bg) == (0.8, 3, 0.9, 0.8)
    assert cfg.srd.enabled and cfg.cg.enabled and cfg.pnl.enabled
    assert cfg.cg.embed_dim == 128 and cfg.cg.threshold_mode == "mean" and cfg.inference_map == "erased"


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("fmcg_")])
def test_presets_load(name):
    cfg = load_config([name])
    assert cfg.method.name == "fmcg" and cfg.model.backbone in name
    assert cfg.method.srd.theta_drop == (0.9 if name.endswith("imagenet") else 0.8)


def test_expected_presets_exist():
    assert {"fmcg_vgg16_cub", "fmcg_vgg16_imagenet"} <= set(preset_names())


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("method.srd.theta_drop=1.2", ["method.srd.theta_drop", "1.2"]),
        ("method.srd.theta_drop=0", ["method.srd.theta_drop", "0"]),
        ("method.srd.kernel_size=4", ["method.srd.kernel_size", "odd"]),
        ("method.srd.schedule_fraction=0", ["method.srd.schedule_fraction"]),
        ("method.cg.tau_bg=0.95", ["method.cg.tau_bg", "method.cg.tau_fg", "smaller"]),
        ("method.cg.threshold_mode=max method.cg.tau_fg=1.2", ["method.cg.tau_fg", "threshold_mode"]),
        ("method.cg.threshold_mode=median", ["method.cg.threshold_mode", "median"]),
        ("method.cg.variant=ntxent", ["method.cg.variant", "infonce"]),
        ("method.cg.margin=-1", ["method.cg.margin"]),
        ("method.cg.temperature=0", ["method.cg.temperature"]),
        ("method.pnl.reduction=0", ["method.pnl.reduction"]),
        ("method.inference_map=sum", ["method.inference_map", "sum"]),
        ("method.weights.cg=-0.5", ["method.weights.cg"]),
        ("method.srd.theta=0.5", ["method.srd", "theta"]),
    ],
)
def test_bad_config_names_the_field(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(base={"method": {"name": "fmcg"}}, overrides=override.split())
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_mean_mode_allows_tau_above_one():
    overrides = ["method.cg.threshold_mode=mean", "method.cg.tau_fg=1.5", "method.cg.tau_bg=0.5"]
    cfg = load_config(base={"method": {"name": "fmcg"}}, overrides=overrides)
    assert cfg.method.cg.tau_fg == 1.5


def test_unknown_drop_stage_fails_when_the_method_is_built():
    with pytest.raises(ConfigError, match=r"method\.srd\.stage = 'conv4_3'.*block3"):
        build(["method.srd.stage=conv4_3"])
    assert build(["method.srd.stage=block2"]).stage == "block2"
    assert build().stage == "block3"  # the tiny backbone's default drop stage


# -- SRD ------------------------------------------------------------------------------------


def test_theta_schedule_and_fixed_threshold_without_srd():
    m = build(["method.srd.theta_drop=0.6"])  # default: a warm-up over the first 0.3 of training
    assert [m.theta(p) for p in (0.0, 0.15, 0.3, 0.9)] == pytest.approx([1.0, 0.8, 0.6, 0.6])
    m = build(["method.srd.theta_drop=0.6", "method.srd.schedule_fraction=1.0"])  # whole-run ramp
    assert [m.theta(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.8, 0.6])
    m = build(["method.srd.theta_drop=0.6", "method.srd.schedule_fraction=0.25"])
    assert [m.theta(p) for p in (0.0, 0.125, 0.25, 0.7)] == pytest.approx([1.0, 0.8, 0.6, 0.6])
    m = build(["method.srd.enabled=false", "method.srd.theta_drop=0.6"])
    assert [m.theta(p) for p in (0.0, 0.5, 1.0)] == [0.6, 0.6, 0.6]  # pixel-level, fixed threshold


def test_srd_mask_on_a_hand_made_feature_map():
    x = torch.zeros(1, 2, 5, 5)
    x[0, 0, 2, 2] = 4.0  # A = 2 at the centre
    x[0, 1, 0, 0] = 3.4  # A = 1.7 at the corner
    x[0, :, 4, 4] = 1.0  # A = 1
    region = build().srd_mask(x, 0.8)[0, 0]  # tau = 1.6 -> centre and corner, grown to 3x3
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1.0
    expected[0:2, 0:2] = 1.0
    assert torch.equal(region, expected)
    pixel = build(["method.srd.enabled=false"]).srd_mask(x, 0.8)[0, 0]  # Table 1's "- SRD": no growth
    expected = torch.zeros(5, 5)
    expected[2, 2] = expected[0, 0] = 1.0
    assert torch.equal(pixel, expected)


def test_erased_branch_is_the_shared_tail_on_x_times_keep_mask():
    m = build().eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        out = m(images, progress=1.0)
        x = m.backbone.forward_features(images, until="block3")
        dropped = drop_mask(channel_attention(x), 0.8, 3)
        assert torch.equal(out["drop_mask"], dropped) and dropped.sum() > 0
        erased = m.pnl(m.backbone.forward_features(x * (1 - dropped), after="block3"))
        original = m.pnl(m.backbone.forward_features(x, after="block3"))
    torch.testing.assert_close(out["features_erased"], erased, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["features"], original, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["logits_erased"], m.head(erased), rtol=1e-4, atol=1e-5)


def test_nothing_is_dropped_at_the_start_of_training():
    m = build().eval()
    with torch.no_grad():
        out = m(torch.randn(2, 3, 112, 112), progress=0.0)
    assert out["drop_mask"].sum() == 0
    torch.testing.assert_close(out["features"], out["features_erased"])


# -- CG -------------------------------------------------------------------------------------


def _unit(*xy: float) -> list[float]:
    n = math.hypot(*xy)
    return [v / n for v in xy]


def _z() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images; z [2B, 2, 2]: rows 0-1 original branch, 2-3 erased; [:, 0] fg, [:, 1] bg."""
    z_fg = [[1.0, 0.0], [0.0, 1.0]]
    z_bg = [[-1.0, 0.0], [0.0, 1.0]]
    zb_fg = [[0.0, 1.0], [0.0, 1.0]]
    zb_bg = [_unit(1.0, 1.0), [1.0, 0.0]]
    z = torch.tensor([[z_fg[0], z_bg[0]], [z_fg[1], z_bg[1]], [zb_fg[0], zb_bg[0]], [zb_fg[1], zb_bg[1]]])
    return z, torch.ones(4, dtype=torch.bool)


def test_cg_loss_eq5_by_hand():
    z, valid = _z()
    m = build(["method.cg.margin=0.5"])
    # image 0: d(fg, fg_b) = sqrt2, d(fg, bg) = 2, d(fg_b, bg_b) = |(0,1) - (1,1)/sqrt2|
    d_b = math.hypot(1 / math.sqrt(2), 1 - 1 / math.sqrt(2))
    img0 = max(math.sqrt(2) - 2 + 0.5, 0) + max(math.sqrt(2) - d_b + 0.5, 0)
    # image 1: fg == fg_b == bg: both terms = 0 - d + m; d(fg,bg) = 0, d(fg_b, bg_b) = sqrt2
    img1 = max(0 - 0 + 0.5, 0) + max(0 - math.sqrt(2) + 0.5, 0)
    assert m.cg_loss(z, valid).item() == pytest.approx((img0 + img1) / 2)
    # An image with an empty mask (either branch) is left out.
    valid = torch.tensor([True, True, True, False])
    assert m.cg_loss(z, valid).item() == pytest.approx(img0)


def test_cg_variant_original_background_only():
    z, valid = _z()
    m = build(["method.cg.margin=0.5", "method.cg.variant=orig_bg"])
    # the second term's negative is z_bg (original branch) instead of zb_bg
    d0 = math.hypot(0 - (-1), 1 - 0)  # d(zb_fg, z_bg) image 0 = sqrt2
    img0 = max(math.sqrt(2) - 2 + 0.5, 0) + max(math.sqrt(2) - d0 + 0.5, 0)
    img1 = max(0.5, 0) + max(0 - 0 + 0.5, 0)
    assert m.cg_loss(z, valid).item() == pytest.approx((img0 + img1) / 2)


def test_cg_variant_infonce():
    z, valid = _z()
    t = 0.5
    m = build(["method.cg.variant=infonce", f"method.cg.temperature={t}"])

    def nce(a, p, negs):
        logits = [sum(x * y for x, y in zip(a, p)) / t] + [sum(x * y for x, y in zip(a, n)) / t for n in negs]
        return -logits[0] + math.log(sum(math.exp(v) for v in logits))

    total = 0.0
    for i in range(2):
        zf, zbg, zbf, zbbg = z[i, 0].tolist(), z[i, 1].tolist(), z[2 + i, 0].tolist(), z[2 + i, 1].tolist()
        total += nce(zf, zbf, [zbg, zbbg]) + nce(zbf, zf, [zbg, zbbg])
    assert m.cg_loss(z, valid).item() == pytest.approx(total / 2, rel=1e-5)


@pytest.mark.parametrize("mode", ["max", "mean", "minmax"])
def test_cg_masks_follow_the_threshold_mode(mode):
    taus = {"max": (0.9, 0.8), "mean": (1.2, 0.8), "minmax": (0.7, 0.3)}[mode]
    m = build([f"method.cg.threshold_mode={mode}", f"method.cg.tau_fg={taus[0]}", f"method.cg.tau_bg={taus[1]}"])
    f = torch.rand(4, m.backbone.out_channels, 3, 3)
    out = m.embed(f)
    a = f.mean(dim=1)
    if mode == "minmax":
        low, high = a.amin(dim=(1, 2), keepdim=True), a.amax(dim=(1, 2), keepdim=True)
        a, ref = (a - low) / (high - low), 1.0
    else:
        ref = a.amax(dim=(1, 2), keepdim=True) if mode == "max" else a.mean(dim=(1, 2), keepdim=True)
    assert torch.equal(out["cg_masks"][:, 0], (a > taus[0] * ref).float())
    assert torch.equal(out["cg_masks"][:, 1], (a < taus[1] * ref).float())
    assert out["z"].shape == (4, 2, 128)
    nonempty = out["cg_masks"].sum(dim=(2, 3)) > 0
    torch.testing.assert_close(out["z"].norm(dim=-1)[nonempty], torch.ones(int(nonempty.sum())))
    assert torch.equal(out["z_valid"], nonempty.all(dim=1))


def test_cg_embeddings_are_masked_means_through_the_head():
    m = build()
    f = torch.rand(2, m.backbone.out_channels, 4, 4)
    out = m.embed(f)
    masks = out["cg_masks"]
    fg = (f * masks[:, :1]).sum(dim=(2, 3)) / masks[:, 0].sum(dim=(1, 2))[:, None]
    torch.testing.assert_close(out["z"][:, 0], m.projection(fg))


# -- switches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "terms", "has_pnl", "has_projection"),
    [
        ([], {"cls", "cls_erased", "cg"}, True, True),
        (["method.cg.enabled=false"], {"cls", "cls_erased"}, True, False),
        (["method.pnl.enabled=false"], {"cls", "cls_erased", "cg"}, False, True),
        (["method.srd.enabled=false"], {"cls", "cls_erased", "cg"}, True, True),
        (
            ["method.cg.enabled=false", "method.pnl.enabled=false", "method.srd.enabled=false"],
            {"cls", "cls_erased"},
            False,
            False,
        ),
    ],
)
def test_switches_change_the_terms_and_modules(overrides, terms, has_pnl, has_projection):
    m = build(overrides)
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    out = m(images, progress=0.5)
    losses = m.losses(out, make_batch(images, labels))
    assert set(losses) == terms
    assert (m.pnl is not None) == has_pnl and (m.projection is not None) == has_projection
    assert ("z" in out) == has_projection
    assert any(n.startswith("pnl.") for n, _ in m.named_parameters()) == has_pnl


def test_loss_weights_scale_the_terms():
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    base = build()
    weighted = build(["method.weights.cls=2", "method.weights.cls_erased=0.5", "method.weights.cg=3"])
    weighted.load_state_dict(base.state_dict())
    base.eval(), weighted.eval()
    with torch.no_grad():
        a = base.losses(base(images, progress=0.7), make_batch(images, labels))
        b = weighted.losses(weighted(images, progress=0.7), make_batch(images, labels))
    for name, factor in (("cls", 2.0), ("cls_erased", 0.5), ("cg", 3.0)):
        torch.testing.assert_close(b[name], factor * a[name])


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [[], ["method.pnl.zero_init=false", "method.cg.variant=infonce"]])
def test_gradients_reach_every_trainable_parameter(overrides):
    m = build(overrides)
    images, labels = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 3])
    losses = m.losses(m(images, progress=0.6), make_batch(images, labels))
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # Real gradient, not just a graph edge: the trunk, the classifier, the projection head and
    # the PNL's output BN always; with a nonzero BN gamma the PNL's q/k/v too (zero-init: the
    # block is the identity at step 0, so q/k/v get exactly 0 until gamma moves).
    for part in (m.backbone, m.head, m.projection, m.pnl.bn):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0, type(part).__name__
    q_grad = m.pnl.query.weight.grad.abs().sum()
    assert (q_grad > 0) if "method.pnl.zero_init=false" in overrides else (q_grad == 0)


def test_param_groups_put_new_parts_at_the_head_rate():
    m = build()
    groups = {g["name"]: g for g in m.param_groups(0.01, 10.0)}
    head_ids = {id(p) for p in groups["head"]["params"]}
    for module in (m.pnl, m.projection, m.head):
        assert all(id(p) in head_ids for p in module.parameters())
    assert groups["head"]["lr"] == pytest.approx(0.1)


# -- inference ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["max", "mean", "erased", "original"])
def test_inference_path(mode):
    m = build([f"method.inference_map={mode}"]).eval()
    images = torch.randn(3, 3, 112, 112)
    labels = torch.tensor([1, -1, 3])
    result = m.inference(images, labels)
    with torch.no_grad():
        x = m.backbone.forward_features(images, until=m.stage)
        original = m.pnl(m.backbone.forward_features(x, after=m.stage))
        dropped = drop_mask(channel_attention(x), 0.8, 3)  # the LAST threshold, theta_drop
        erased = m.pnl(m.backbone.forward_features(x * (1 - dropped), after=m.stage))
        logits = m.head(original)
        classes = torch.tensor([1, int(logits[1].argmax()), 3])  # -1: the predicted class
        cam_o = torch.einsum("bc,bchw->bhw", m.head.fc.weight[classes], original)
        cam_e = torch.einsum("bc,bchw->bhw", m.head.fc.weight[classes], erased)
    expected = {"max": torch.maximum(cam_o, cam_e), "mean": (cam_o + cam_e) / 2, "erased": cam_e, "original": cam_o}[
        mode
    ]
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.maps, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.localization_maps(images, labels), result.maps)
    assert result.maps.shape == (3, 14, 14)


def test_inference_with_srd_off_uses_pixel_level_drop():
    m = build(["method.srd.enabled=false", "method.inference_map=erased"]).eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        x = m.backbone.forward_features(images, until=m.stage)
        erased = m.pnl(m.backbone.forward_features(x * (1 - drop_mask(channel_attention(x), 0.8, 1)), after=m.stage))
        classes = m.head(m.pnl(m.backbone.forward_features(x, after=m.stage))).argmax(1)
        expected = m.head.class_maps(erased, classes)
    torch.testing.assert_close(m.inference(images).maps, expected, rtol=1e-4, atol=1e-4)


# -- shapes, precision ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backbone", "size", "large", "side"),
    [
        ("tiny", 112, False, 14),
        ("vgg16", 224, False, 14),
        ("resnet50", 224, False, 14),
        ("inception_v3", 224, False, 14),
        ("vgg16", 224, True, 28),
    ],
)
def test_shapes_on_every_backbone(backbone, size, large, side):
    m = build(backbone=backbone, classes=5, large=large)
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 4])
    with torch.no_grad():
        out = m(images, progress=0.5)
        losses = m.losses(out, make_batch(images, labels))
    c = m.backbone.out_channels
    assert out["logits"].shape == out["logits_erased"].shape == (2, 5)
    assert out["features"].shape == out["features_erased"].shape == (2, c, side, side)
    assert out["z"].shape == (4, 2, 128) and out["cg_masks"].shape == (4, 2, side, side)
    assert set(losses) == {"cls", "cls_erased", "cg"} and all(torch.isfinite(v) for v in losses.values())


def test_bf16_autocast_and_channels_last():
    m = build(["method.pnl.zero_init=false"]).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 112, 112).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images, progress=0.8)
        losses = m.losses(out, make_batch(images, torch.tensor([0, 1])))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert out["z"].dtype == torch.float32
    sum(losses.values()).backward()
    m.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = m.localization_maps(images)
    assert maps.shape == (2, 14, 14) and torch.isfinite(maps).all()


# -- smoke fit ------------------------------------------------------------------------------


def learnable_batch(n: int = 8, size: int = 64, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A coloured square on a noisy background; the class is the colour."""
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.randn(n, 3, size, size, generator=g)
    labels = torch.arange(n) % classes
    palette = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])
    for i in range(n):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        images[i, :, y0 : y0 + size // 3, x0 : x0 + size // 3] += palette[int(labels[i])][:, None, None]
    return images, labels


def test_smoke_fit_on_cpu():
    torch.manual_seed(0)
    m = FMCG(TinyCNN(width=16), 4, load_config(base={"method": {"name": "fmcg"}}).method)  # a narrow tiny: fast
    images, labels = learnable_batch()
    batch = make_batch(images, labels)
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    history = []
    steps = 30
    for step in range(steps):
        losses = m.losses(m(images, progress=step / (steps - 1)), batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5, history
    m.eval()
    maps = m.localization_maps(images, labels)
    assert maps.shape == (8, 8, 8) and torch.isfinite(maps).all()
