"""Backbones: the protocol's shapes, stage splitting, parameter groups and pretrained loading."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import inception_v3, resnet50, vgg16

from wsol_core.models import BACKBONES, CAMHead, PretrainedMismatchError, build_backbone, load_pretrained

SIZES = {"vgg16": 224, "resnet50": 224, "inception_v3": 224, "tiny": 112}


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("large", [False, True])
def test_feature_map_is_14x14_or_28x28(name, large):
    backbone = build_backbone(name, large_feature_map=large).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, SIZES[name], SIZES[name]))
    side = 28 if large else 14
    assert features.shape == (1, backbone.out_channels, side, side)


@pytest.mark.parametrize("name", ["vgg16", "tiny", "resnet50"])
def test_split_forward_equals_full_forward(name):
    backbone = build_backbone(name).eval()
    x = torch.randn(2, 3, SIZES[name], SIZES[name])
    with torch.no_grad():
        full = backbone(x)
        mid = backbone.forward_features(x, until=backbone.default_drop_stage)
        rest = backbone.forward_features(mid, after=backbone.default_drop_stage)
    assert mid.shape[1] == backbone.stage_channels(backbone.default_drop_stage)
    torch.testing.assert_close(rest, full)


def test_vgg_drop_stage_is_after_conv4_3():
    backbone = build_backbone("vgg16")
    mid = backbone.forward_features(torch.randn(1, 3, 224, 224), until="block4")
    # conv4_3 runs at 1/8 resolution before pool4: 28x28 with 512 channels.
    assert mid.shape == (1, 512, 28, 28)


def test_unknown_stage_and_backbone_are_clear_errors():
    backbone = build_backbone("tiny")
    with pytest.raises(ValueError, match="no stage 'conv9'"):
        backbone.forward_features(torch.randn(1, 3, 32, 32), until="conv9")
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'"):
        build_backbone("vgg19")


def test_cam_head_maps_average_to_logits_minus_bias():
    head = CAMHead(8, 5)
    features = torch.randn(3, 8, 7, 7)
    maps = head.class_maps(features)
    torch.testing.assert_close(maps.mean(dim=(2, 3)) + head.fc.bias, head(features))
    classes = torch.tensor([4, 0, 2])
    torch.testing.assert_close(head.class_maps(features, classes), maps[torch.arange(3), classes])


@pytest.mark.parametrize(
    ("name", "head_prefixes"),
    [("vgg16", ("conv6.",)), ("resnet50", ("layer4.",)), ("inception_v3", ("SPG_A3",)), ("tiny", ("conv6.",))],
)
def test_head_stages_are_the_protocols_new_layers(name, head_prefixes):
    backbone = build_backbone(name)
    names = backbone.head_parameter_names()
    assert names and all(n.startswith(head_prefixes) for n in names)
    all_names = {n for n, _ in backbone.named_parameters()}
    assert {n for n in all_names if n.startswith(head_prefixes)} == names


def _save(state, tmp_path, name="w.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    ("name", "factory", "dropped_prefix", "fresh_prefix"),
    [
        ("vgg16", lambda: vgg16(weights=None), "classifier.", "conv6."),
        ("resnet50", lambda: resnet50(weights=None), "fc.", None),
        ("inception_v3", lambda: inception_v3(weights=None, aux_logits=True, init_weights=False), "Mixed_7", "SPG_A3"),
    ],
)
def test_torchvision_state_dict_loads_with_expected_differences(tmp_path, name, factory, dropped_prefix, fresh_prefix):
    torch.manual_seed(0)
    source = factory().state_dict()
    path = _save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path)
    backbone = build_backbone(name)
    report = load_pretrained(backbone, path)
    assert report.loaded and any(k.startswith(dropped_prefix) for k in report.dropped)
    if fresh_prefix:
        assert report.fresh and all(k.startswith(fresh_prefix) for k in report.fresh)
    target = backbone.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(target[key], source[key])


def test_mismatched_weights_are_reported_not_ignored(tmp_path):
    source = vgg16(weights=None).state_dict()
    del source["features.0.weight"]
    source["features.99.weight"] = torch.zeros(1)
    with pytest.raises(PretrainedMismatchError) as err:
        load_pretrained(build_backbone("vgg16"), _save(source, tmp_path))
    assert "features.0.weight" in str(err.value) and "features.99.weight" in str(err.value)

    wrong = resnet50(weights=None).state_dict()
    wrong["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(PretrainedMismatchError, match="shape mismatch"):
        load_pretrained(build_backbone("resnet50"), _save(wrong, tmp_path, "r.pth"))


def test_missing_file_and_tiny_backbone_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_pretrained(build_backbone("vgg16"), tmp_path / "nothing.pth")
    with pytest.raises(
        PretrainedMismatchError, match="no torchvision weights; pretrain a trunk with `wsol-pretrain-trunk`"
    ):
        load_pretrained(build_backbone("tiny"), "torchvision")


class NotAStateDict:
    """Stands for arbitrary pickled code in a weights file."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": NotAStateDict()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_pretrained(build_backbone("vgg16"), path)


def test_backbone_from_a_training_checkpoint(tmp_path):
    from wsol_core.checkpoint import TrainingState, save_training_state
    from wsol_core.config import load_config, to_dict
    from wsol_core.methods import build_method

    torch.manual_seed(0)
    cfg = load_config(overrides=["method.name=cam", "model.backbone=tiny"])
    trained = build_method(cfg, num_classes=5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # unlike any fresh initialization
    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    save_training_state(
        ckpt, TrainingState(epoch=2, model=trained.state_dict(), optimizer={}, scheduler={}, config=to_dict(cfg))
    )

    # Another method on the same backbone kind starts from the checkpoint's backbone (directory
    # or state.pt), through the config like any pretrained weights; its own head stays fresh.
    for source in (ckpt, ckpt / "state.pt"):
        started = build_method(
            load_config(overrides=["method.name=c2am", "model.backbone=tiny", f"model.pretrained={source}"]),
            num_classes=5,
        )
        for key, value in trained.backbone.state_dict().items():
            torch.testing.assert_close(started.backbone.state_dict()[key], value)

    # A checkpoint of another architecture is refused with both named.
    with pytest.raises(PretrainedMismatchError, match=r"TinyCNN <- .*state.pt \(a 'tiny' checkpoint\)"):
        load_pretrained(build_backbone("tiny", large_feature_map=False).__class__(width=16), ckpt)


def test_protocol_init_of_new_layers():
    """wsolevaluation's VggCam: conv6 He-normal (fan_out, ReLU), zero bias; every protocol
    architecture's classifier N(0, 0.01), zero bias. The tiny CPU backbone keeps Xavier."""
    import math

    from wsol_core.config import load_config
    from wsol_core.methods import build_method

    torch.manual_seed(0)
    cfg = load_config(base={"model": {"backbone": "vgg16"}, "method": {"name": "fmcg"}})
    method = build_method(cfg, 200)
    conv6 = method.backbone.conv6
    fan_out = conv6.out_channels * conv6.kernel_size[0] * conv6.kernel_size[1]
    assert conv6.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert torch.count_nonzero(conv6.bias) == 0
    fc = method.head.fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and torch.count_nonzero(fc.bias) == 0
    tiny = build_method(load_config(base={"method": {"name": "cam"}}), 10)
    bound = math.sqrt(6.0 / sum(tiny.head.fc.weight.shape))  # Xavier-uniform limit
    assert tiny.head.fc.weight.abs().max().item() <= bound and tiny.head.fc.weight.std().item() > 0.05
