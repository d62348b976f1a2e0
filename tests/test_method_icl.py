"""ICL (wsol_core/methods/icl.py): both drops, non-local attention for dropping, the contrastive
attention loss, the foreground consistency loss, switches, inference, gradients, shapes, smoke fit."""

from __future__ import annotations

import math

import pytest
import torch

from wsol_core.config import ConfigError, load_config, preset_names
from wsol_core.data.batch import Batch
from wsol_core.methods import build_method
from wsol_core.methods.components import channel_attention, drop_mask, resize_mask
from wsol_core.methods.icl import ICL, ICLConfig, background_mask, consistency_term
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


def build(overrides: list[str] | None = None, backbone: str = "tiny", classes: int = 4, large: bool = False) -> ICL:
    cfg = load_config(
        base={"method": {"name": "icl"}},
        overrides=[f"model.backbone={backbone}", f"model.large_feature_map={str(large).lower()}", *(overrides or [])],
    )
    torch.manual_seed(0)
    return build_method(cfg, classes)


# -- config ---------------------------------------------------------------------------------


def test_defaults_and_preset():
    cfg = load_config(base={"method": {"name": "icl"}}).method
    assert isinstance(cfg, ICLConfig)
    assert cfg.drop.kernel_size == 1 and not cfg.drop.scheduled  # pixel-level, fixed threshold
    assert cfg.bg_drop.enabled and cfg.cal.enabled and cfg.fcl.enabled and cfg.nl.enabled
    assert cfg.inference_map == "original"
    assert "icl_vgg16_cub" in preset_names()
    preset = load_config(["icl_vgg16_cub"])
    assert preset.method.name == "icl" and preset.model.backbone == "vgg16" and preset.method.drop.theta_drop == 0.8


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("method.bg_drop.theta_bg=0.85", ["method.bg_drop.theta_bg", "method.drop.theta_drop"]),
        ("method.bg_drop.theta_bg=1.0", ["method.bg_drop.theta_bg", "1.0"]),
        ("method.drop.kernel_size=2", ["method.drop.kernel_size", "odd"]),
        ("method.cal.tau_bg=0.9", ["method.cal.tau_bg", "method.cal.tau_fg"]),
        ("method.cal.negative=other", ["method.cal.negative", "other"]),
        ("method.fcl.distance=l3", ["method.fcl.distance", "l3"]),
        ("method.fcl.normalize=softmax", ["method.fcl.normalize"]),
        ("method.weights.fcl=-1", ["method.weights.fcl"]),
        ("method.inference_map=sum", ["method.inference_map"]),
        ("method.nl.reduction=0", ["method.nl.reduction"]),
    ],
)
def test_bad_config_names_the_field(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(base={"method": {"name": "icl"}}, overrides=[override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_bg_drop_negative_needs_the_background_drop():
    with pytest.raises(ConfigError, match=r"method\.cal\.negative.*method\.bg_drop\.enabled"):
        load_config(
            base={"method": {"name": "icl"}}, overrides=["method.cal.negative=bg_drop", "method.bg_drop.enabled=false"]
        )
    assert build(["method.bg_drop.enabled=false"]).negative == "final"  # "auto" falls back
    assert build().negative == "bg_drop"


@pytest.mark.parametrize("stages", ["[conv9]", "[conv6]"])
def test_bad_fcl_stage_fails_when_built(stages):
    with pytest.raises(ConfigError, match=r"method\.fcl\.stages"):
        build([f"method.fcl.stages={stages}"])
    with pytest.raises(ConfigError, match=r"method\.drop\.stage"):
        build(["method.drop.stage=pool4"])


# -- drops ----------------------------------------------------------------------------------


def test_background_mask_by_hand():
    a = torch.tensor([[[[0.0, 1.0, 2.0], [5.0, 9.0, 10.0]]]])
    assert background_mask(a, 0.2).flatten().tolist() == [1, 1, 0, 0, 0, 0]  # < 2
    assert background_mask(a, 0.55).flatten().tolist() == [1, 1, 1, 1, 0, 0]  # < 5.5


def test_both_drops_on_a_hand_made_map_without_non_local():
    m = build(["method.nl.enabled=false", "method.drop.theta_drop=0.8", "method.bg_drop.theta_bg=0.3"])
    x = torch.zeros(1, 2, 3, 3)
    x[0, 0] = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 10.0]])  # A = x0 / 2, max 5
    high, low = m.drop_masks(x, m.theta(0.3))
    assert high[0, 0].flatten().tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1]  # A > 4
    assert low[0, 0].flatten().tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]  # A < 1.5
    assert m.theta(0.0) == m.theta(1.0) == 0.8  # fixed threshold by default
    scheduled = build(["method.drop.scheduled=true"])
    assert [scheduled.theta(p) for p in (0.0, 0.15, 0.3, 1.0)] == pytest.approx(
        [1.0, 0.9, 0.8, 0.8]
    )  # warm-up: first 0.3
    region = build(["method.nl.enabled=false", "method.drop.kernel_size=3"]).drop_masks(x, 0.8)[0]
    assert region[0, 0].flatten().tolist() == [0, 0, 0, 0, 1, 1, 0, 1, 1]


def _affinity_by_hand(block, x: torch.Tensor) -> torch.Tensor:
    """ICL's non-local attention computed here: W = softmax_j((q_i - mean q)^T (k_j - mean k)),
    A'_i = sum_j W_ij mean_c(X'_j) with X' the block's output."""
    q, k = block.query(x).flatten(2), block.key(x).flatten(2)
    q, k = q - q.mean(dim=2, keepdim=True), k - k.mean(dim=2, keepdim=True)
    w = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
    a = block(x).mean(dim=1).flatten(1)  # [B, N]
    return (w @ a.unsqueeze(-1)).reshape(x.shape[0], 1, x.shape[2], x.shape[3])


@pytest.mark.parametrize("mode", ["channel_mean", "affinity"])
def test_erased_input_drops_peak_and_background_of_the_non_local_attention(mode):
    m = build(["method.nl.zero_init=false", f"method.nl.attention={mode}"]).eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = m(images)
        f = m.backbone.forward_features(images, until="block3")
        x = m.nl_drop(f)
        a = _affinity_by_hand(m.nl_drop, f) if mode == "affinity" else channel_attention(x)
        assert not torch.equal(a, channel_attention(f))  # not the plain pooling of X
        high, low = drop_mask(a, 0.8, 1), background_mask(a, 0.2)
        assert torch.equal(out["drop_mask"], high) and torch.equal(out["bg_drop_mask"], low)
        erased = m.nl_final(m.backbone.forward_features(x * (1 - high) * (1 - low), after="block3"))
    torch.testing.assert_close(out["features_erased"], erased, rtol=1e-4, atol=1e-5)


def test_non_local_attention_replaces_channel_pooling_from_the_start():
    """With the block's output branch zero-initialised, X' = X, so the channel mean of the block's
    output IS plain channel pooling at step 0 (``nl.attention = channel_mean``); the affinity
    reading carries it through W and differs from the first step."""
    images = torch.randn(2, 3, 112, 112)
    affinity = build(["method.nl.attention=affinity"]).eval()
    mean_mode = build(["method.nl.attention=channel_mean"]).eval()
    mean_mode.load_state_dict(affinity.state_dict())
    with torch.no_grad():
        f = affinity.backbone.forward_features(images, until="block3")
        plain = channel_attention(f)
        x, w = affinity.nl_drop(f, return_weights=True)
        torch.testing.assert_close(mean_mode.attention(x, w), plain)
        enhanced = affinity.attention(x, w)
        torch.testing.assert_close(enhanced, _affinity_by_hand(affinity.nl_drop, f), rtol=1e-4, atol=1e-6)
        assert (enhanced - plain).abs().max() > 1e-3 * plain.abs().max()


# -- contrastive attention loss -------------------------------------------------------------


def test_cal_loss_by_hand():
    m = build(["method.cal.margin=0.5"])
    # z: [B, 3, D] = (z_fg, z_bg, zb_fg)
    z = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    # image 0: |zb_fg - z_fg| = sqrt2, |zb_fg - z_bg| = sqrt2 -> 0.5; image 1: 0 - sqrt2 + 0.5 < 0 -> 0
    assert m.cal_loss(z, torch.tensor([True, True])).item() == pytest.approx(0.25)
    assert m.cal_loss(z, torch.tensor([True, False])).item() == pytest.approx(0.5)


@pytest.mark.parametrize("negative", ["bg_drop", "final"])
def test_cal_negative_region(negative):
    m = build([f"method.cal.negative={negative}"])
    f = torch.rand(4, m.backbone.out_channels, 7, 7)
    bg_drop = (torch.rand(2, 1, 14, 14) > 0.5).float()
    out = m.embed(f, bg_drop)
    a = f.mean(dim=1, keepdim=True)
    peak = a.amax(dim=(2, 3), keepdim=True)
    fg = (a > 0.9 * peak).float()
    expected_neg = resize_mask(bg_drop, (7, 7)) if negative == "bg_drop" else (a[:2] < 0.8 * peak[:2]).float()
    assert torch.equal(out["cal_masks"], torch.cat([fg[:2], expected_neg, fg[2:]], dim=1))
    pooled_neg = (f[:2] * expected_neg).sum(dim=(2, 3)) / expected_neg.sum(dim=(2, 3)).clamp_min(1)
    torch.testing.assert_close(out["z"][:, 1], m.projection(pooled_neg))


# -- foreground consistency loss ------------------------------------------------------------


def test_consistency_term_by_hand():
    early = torch.tensor([[[[1.0, 2.0], [2.0, 4.0]]]])  # /max -> [.25, .5, .5, 1]
    ref = torch.tensor([[[[2.0, 0.0], [0.0, 2.0]]]])  # /max -> [1, 0, 0, 1]
    assert consistency_term(early, ref, "max", "l1").item() == pytest.approx((0.75 + 0.5 + 0.5 + 0) / 4)
    assert consistency_term(early, ref, "max", "l2").item() == pytest.approx((0.75**2 + 0.25 + 0.25) / 4)
    # min-max: early -> [0, 1/3, 1/3, 1], ref -> [1, 0, 0, 1]
    assert consistency_term(early, ref, "minmax", "l1").item() == pytest.approx((1 + 1 / 3 + 1 / 3) / 4)
    # the reference is resized to the earlier map's resolution: a constant 1x1 reference
    assert consistency_term(early, torch.ones(1, 1, 1, 1), "max", "l1").item() == pytest.approx((0.75 + 0.5 + 0.5) / 4)


def test_consistency_reference_is_detached():
    early = torch.rand(2, 1, 4, 4, requires_grad=True)
    ref = torch.rand(2, 1, 2, 2, requires_grad=True)
    consistency_term(early, ref).backward()
    assert early.grad is not None and early.grad.abs().sum() > 0 and ref.grad is None


def test_fcl_trains_earlier_layers_only():
    m = build(["method.fcl.stages=[block2, block3]", "method.nl.zero_init=false"])
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    out = m(images, progress=0.5)
    assert {"attention_block2", "attention_block3"} <= set(out)
    torch.testing.assert_close(
        out["attention_block2"], channel_attention(m.backbone.forward_features(images, until="block2"))
    )
    loss = m.losses(out, make_batch(images, labels))["fcl"]
    loss.backward()
    assert m.backbone.block1[0].weight.grad.abs().sum() > 0 and m.nl_drop.query.weight.grad.abs().sum() > 0
    for later in (m.backbone.block4, m.backbone.conv6, m.nl_final, m.head):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in later.parameters())


def test_fcl_value_matches_the_term_on_the_original_branch():
    m = build(["method.fcl.distance=l2"]).eval()
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    with torch.no_grad():
        out = m(images)
        early = channel_attention(m.nl_drop(m.backbone.forward_features(images, until="block3")))
        expected = consistency_term(early, channel_attention(out["features"]), "max", "l2")
        assert m.losses(out, make_batch(images, labels))["fcl"].item() == pytest.approx(expected.item(), rel=1e-5)


# -- switches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "terms", "nl_drop", "nl_final"),
    [
        ([], {"cls", "cls_erased", "cal", "fcl"}, True, True),
        (["method.cal.enabled=false"], {"cls", "cls_erased", "fcl"}, True, True),
        (["method.fcl.enabled=false"], {"cls", "cls_erased", "cal"}, True, True),
        (["method.nl.enabled=false"], {"cls", "cls_erased", "cal", "fcl"}, False, False),
        (["method.nl.at_final=false"], {"cls", "cls_erased", "cal", "fcl"}, True, False),
        (["method.bg_drop.enabled=false"], {"cls", "cls_erased", "cal", "fcl"}, True, True),
    ],
)
def test_switches(overrides, terms, nl_drop, nl_final):
    m = build(overrides)
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([0, 1])
    out = m(images, progress=0.5)
    assert set(m.losses(out, make_batch(images, labels))) == terms
    assert (m.nl_drop is not None) == nl_drop and (m.nl_final is not None) == nl_final
    assert (m.projection is not None) == ("cal" in terms)
    if "method.bg_drop.enabled=false" in overrides:
        assert out["bg_drop_mask"].sum() == 0


# -- gradients, inference, shapes, smoke -----------------------------------------------------


def test_gradients_reach_every_trainable_parameter():
    m = build(["method.nl.zero_init=false", "method.cal.negative=final", "method.fcl.stages=[block2, block3, block4]"])
    images, labels = learnable_batch(4, 112)
    losses = m.losses(m(images, progress=0.5), make_batch(images, labels))
    assert losses["cal"] > 0
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.projection.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["original", "max"])
def test_inference_path(mode):
    m = build([f"method.inference_map={mode}", "method.nl.zero_init=false"]).eval()
    images, labels = torch.randn(2, 3, 112, 112), torch.tensor([2, -1])
    result = m.inference(images, labels)
    with torch.no_grad():
        x = m.nl_drop(m.backbone.forward_features(images, until="block3"))
        original = m.nl_final(m.backbone.forward_features(x, after="block3"))
        logits = m.head(original)
        classes = torch.tensor([2, int(logits[1].argmax())])
        expected = m.head.class_maps(original, classes)
        if mode == "max":
            a = channel_attention(x)
            erased = m.nl_final(
                m.backbone.forward_features(
                    x * (1 - drop_mask(a, 0.8, 1)) * (1 - background_mask(a, 0.2)), after="block3"
                )
            )
            expected = torch.maximum(expected, m.head.class_maps(erased, classes))
    torch.testing.assert_close(result.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.maps, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("backbone", "size", "large", "side"),
    [
        ("tiny", 112, False, 14),
        ("vgg16", 224, False, 14),
        ("resnet50", 224, False, 14),
        ("inception_v3", 224, False, 14),
        ("tiny", 112, True, 28),
    ],
)
def test_shapes_on_every_backbone(backbone, size, large, side):
    m = build(backbone=backbone, classes=5, large=large)
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 4])
    with torch.no_grad():
        out = m(images, progress=0.5)
        losses = m.losses(out, make_batch(images, labels))
    assert out["logits"].shape == out["logits_erased"].shape == (2, 5)
    assert out["features"].shape == (2, m.backbone.out_channels, side, side)
    assert out["z"].shape == (2, 3, 128) and out["cal_masks"].shape == (2, 3, side, side)
    assert out["drop_mask"].shape == out["bg_drop_mask"].shape == (2, 1, *out[f"attention_{m.stage}"].shape[-2:])
    assert set(losses) == {"cls", "cls_erased", "cal", "fcl"} and all(torch.isfinite(v) for v in losses.values())


def test_bf16_autocast_and_channels_last():
    m = build(["method.nl.zero_init=false"]).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 112, 112).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m.losses(m(images, progress=0.5), make_batch(images, torch.tensor([0, 1])))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_smoke_fit_on_cpu():
    torch.manual_seed(0)
    m = ICL(TinyCNN(width=16), 4, load_config(base={"method": {"name": "icl"}}).method)  # a narrow tiny: fast
    images, labels = learnable_batch()
    batch = make_batch(images, labels)
    opt = torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9)
    history = []
    for step in range(30):
        losses = m.losses(m(images, progress=step / 29), batch)
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
