"""Every method honours the shared interface the loop, evaluation and Tune rely on."""

from __future__ import annotations

import pytest
import torch

from wsol_core.config import load_config
from wsol_core.data.batch import Batch
from wsol_core.methods import METHOD_NAMES, Inference, WSOLMethod, build_method

NUM_CLASSES = 4


def make_batch(size: int = 112, count: int = 4, labels: list[int] | None = None) -> Batch:
    generator = torch.Generator().manual_seed(0)
    labels_t = torch.tensor(labels if labels is not None else [i % NUM_CLASSES for i in range(count)])
    return Batch(
        images=torch.randn(count, 3, size, size, generator=generator),
        labels=labels_t,
        keys=[f"k{i}" for i in range(count)],
        orig_sizes=torch.full((count, 2), size),
        boxes=torch.tensor([[[10.0, 10.0, 60.0, 60.0]]]).repeat(count, 1, 1),
        num_boxes=torch.ones(count, dtype=torch.int64),
        # What a torch loader reports with a sidecar (the box regressor learns from them).
        views=torch.tensor([[0.0, 0.0, float(size), float(size), 0.0]]).repeat(count, 1),
        pseudo_boxes=torch.tensor([[12.0, 8.0, 70.0, 50.0]]).repeat(count, 1),
    )


def build(name: str, backbone: str = "tiny") -> WSOLMethod:
    cfg = load_config(overrides=[f"method.name={name}", f"model.backbone={backbone}"])
    return build_method(cfg, NUM_CLASSES)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_interface_shapes_and_finite_losses(name):
    torch.manual_seed(0)
    method = build(name).train()
    batch = make_batch()
    outputs = method(batch.images, batch.labels, progress=0.5)
    assert isinstance(outputs, dict)
    terms = method.losses(outputs, batch)
    assert terms and all(t.ndim == 0 and torch.isfinite(t) for t in terms.values()), terms
    method.eval()
    result = method.inference(batch.images, batch.labels)
    assert isinstance(result, Inference)
    # Maps at the feature map's resolution; the regressor draws its box at the input's.
    grid = (112, 112) if name == "regressor" else (14, 14)
    assert result.maps.shape == (4, *grid) and torch.isfinite(result.maps).all()
    if result.logits is not None:
        assert result.logits.shape == (4, NUM_CLASSES)
    maps = method.localization_maps(batch.images)  # no labels: predicted class / agnostic
    assert maps.shape == (4, *grid)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_label_free_methods_train_on_unlabeled_batches(name):
    method = build(name).train()
    if method.uses_labels:
        pytest.skip("supervised method")
    batch = make_batch(labels=[-1, -1, -1, -1])
    terms = method.losses(method(batch.images, batch.labels, 0.0), batch)
    sum(terms.values()).backward()
    assert all(torch.isfinite(t) for t in terms.values())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_param_groups_cover_every_parameter_once(name):
    method = build(name, backbone="vgg16")
    groups = method.param_groups(lr=0.1, head_lr_mult=10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in method.parameters() if p.requires_grad)
    trunk, head = groups
    assert trunk["lr"] == 0.1 and head["lr"] == pytest.approx(1.0)
    first_conv = method.backbone.features[0].weight
    assert any(p is first_conv for p in trunk["params"])
    # The protocol's new layers learn at the head's rate; PSOL's regressor gives that rate to its
    # box head only (the whole backbone is its trunk).
    new_layer = method.backbone.conv6.weight
    assert any(p is new_layer for p in (trunk if name == "regressor" else head)["params"])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_dict_round_trip_gives_identical_maps(name):
    torch.manual_seed(1)
    method = build(name).eval()
    clone = build(name).eval()
    clone.load_state_dict(method.state_dict())
    batch = make_batch()
    torch.testing.assert_close(
        method.localization_maps(batch.images, batch.labels), clone.localization_maps(batch.images, batch.labels)
    )


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bf16_autocast_and_channels_last(name):
    method = build(name).train().to(memory_format=torch.channels_last)
    batch = make_batch()
    images = batch.images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = method.losses(method(images, batch.labels, 1.0), batch)
    total = sum(t.float() for t in terms.values())
    assert torch.isfinite(total)
    total.backward()


def test_each_methods_declared_knobs_name_real_fields():
    """TUNABLE, SWITCHES and ABLATED are what the search, the sweep and the reports read: each
    must name a field that exists (renaming a field without them fails here)."""
    from wsol_core.config import flatten, load_config, to_dict
    from wsol_core.methods import method_configs

    for name, config_class in method_configs().items():
        fields = flatten(to_dict(load_config(overrides=[f"method.name={name}"])))
        for short, dotted in config_class.TUNABLE.items():
            assert f"method.{dotted}" in fields, (name, short, dotted)
        for part in config_class.SWITCHES:
            assert fields.get(f"method.{part}.enabled") is True, (name, part)
        assert set(config_class.ABLATED) <= set(config_class.SWITCHES), name


def test_the_outer_layers_read_the_declared_knobs():
    from wsol_core.experiments.space import PARAMETERS
    from wsol_core.experiments.sweep import ABLATION_VARIANTS
    from wsol_core.reporting import method_switches, switch_name

    assert PARAMETERS["theta_drop"] == {"fmcg": "method.srd.theta_drop", "icl": "method.drop.theta_drop"}
    assert PARAMETERS["margin"] == {
        "fmcg": "method.cg.margin",
        "icl": "method.cal.margin",
        "caml": "method.caml.margin",
    }
    assert PARAMETERS["alpha"] == {"c2am": "method.alpha"}
    assert list(ABLATION_VARIANTS) == ["cam", "fmcg", "fmcg-no-srd", "fmcg-no-cg", "fmcg-no-pnl", "icl", "caml", "c2am"]
    assert ABLATION_VARIANTS["fmcg-no-cg"] == ["method.name=fmcg", "method.cg.enabled=false"]
    assert switch_name("bg_drop") == "BG-drop" and switch_name("new_part") == "NEW-PART"
    params = {"method.pnl.enabled": "True", "method.srd.enabled": "False", "method.cg.enabled": "True"}
    assert list(method_switches(params)) == ["srd", "cg", "pnl"]  # the paper's column order
