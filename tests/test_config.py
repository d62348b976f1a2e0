"""Typed config: YAML, dotted overrides, presets, and validation messages that name the field."""

from __future__ import annotations

import pytest

from wsol_core.config import Config, ConfigError, dump_yaml, flatten, load_config, parse_override, read_yaml


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config(base={"method": {"name": "cam"}})
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "tiny" and cfg.method.name == "cam"
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config([path])
    assert again == cfg


def test_dotted_override_parses_yaml_scalars():
    assert parse_override("optim.lr=0.001") == {"optim": {"lr": 1e-3}}
    assert load_config(base={"method": {"name": "cam"}}, overrides=["optim.lr=1e-3"]).optim.lr == 1e-3
    assert parse_override("eval.iou_thresholds=[30, 50]") == {"eval": {"iou_thresholds": [30, 50]}}
    cfg = load_config(
        base={"method": {"name": "cam"}}, overrides=["optim.lr=0.5", "train.amp=off", "model.pretrained=null"]
    )
    assert cfg.optim.lr == 0.5 and cfg.train.amp == "off" and cfg.model.pretrained is None


def test_yaml_file_then_override_order(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("method: {name: cam}\noptim:\n  lr: 0.2\n  momentum: 0.5\n")
    cfg = load_config([path], ["optim.lr=0.3"])
    assert cfg.optim.lr == 0.3 and cfg.optim.momentum == 0.5


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("optim.lr=-1", ["optim.lr", "-1", "(0.0, inf)"]),
        ("optim.momentum=1.0", ["optim.momentum", "[0.0, 1.0)"]),
        ("model.backbone=vgg19", ["model.backbone", "vgg19", "vgg16"]),
        ("method.name=nope", ["method.name", "nope", "fmcg"]),
        ("train.epochs=two", ["train.epochs", "two", "integer"]),
        ("train.channels_last=3", ["train.channels_last", "true or false"]),
        ("optim.nonexistent=1", ["optim", "nonexistent"]),
        ("eval.iou_thresholds=[30, 120]", ["eval.iou_thresholds", "120"]),
        ("data.crop_size=300", ["data.crop_size", "300", "resize_size"]),
        ("optim.lr", ["optim.lr", "section.field=value"]),
    ],
)
def test_bad_values_name_the_field_value_and_rule(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(base={"method": {"name": "cam"}}, overrides=[override])
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_unknown_config_source_lists_presets():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        read_yaml("no_such_preset")


def test_bad_yaml_file_is_reported_with_its_path(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config([path])


def test_flatten_gives_dotted_leaves():
    flat = flatten(load_config(base={"method": {"name": "cam"}}))
    assert flat["optim.lr"] == 0.01
    assert flat["method.name"] == "cam"
    assert flat["eval.iou_thresholds"] == [30, 50, 70]
    assert all(not isinstance(v, dict) for v in flat.values())


def test_switching_method_drops_the_previous_methods_fields(tmp_path):
    path = tmp_path / "cam.yaml"
    path.write_text("method: {name: cam}\n")
    cfg = load_config([path], ["method.name=cam"])
    assert type(cfg.method).__name__ == "CAMConfig"


def test_every_loader_option_is_reachable_from_the_config():
    """One concept, one config: each LoaderOptions field comes from data.<same name> or from the
    documented place, and a --set of it arrives in the options."""
    from dataclasses import fields

    from wsol_core.config import DataConfig
    from wsol_core.data.loader import LoaderOptions
    from wsol_core.train.loop import LOADER_OPTIONS_FROM_ELSEWHERE, loader_options

    options = {f.name for f in fields(LoaderOptions)}
    assert options - {f.name for f in fields(DataConfig)} == set(LOADER_OPTIONS_FROM_ELSEWHERE)
    cfg = load_config(
        overrides=[
            "data.hflip=false",
            "data.rrc_scale=[0.2,0.9]",
            "data.rrc_ratio=[0.5,2.0]",
            "data.shuffle_buffer=64",
            "data.prefetch=3",
            "data.verify=full",
            "data.mask_size=112",
            "data.worker_start=spawn",
            "data.jpeg_check=structure",
            "data.num_threads=3",
            "train.seed=7",
        ]
    )
    got = loader_options(cfg)
    assert (
        got.hflip,
        got.rrc_scale,
        got.rrc_ratio,
        got.shuffle_buffer,
        got.prefetch,
        got.verify,
        got.mask_size,
        got.worker_start,
    ) == (False, (0.2, 0.9), (0.5, 2.0), 64, 3, "full", 112, "spawn")
    assert (got.jpeg_check, got.num_threads, got.seed) == ("structure", 3, 7)
    with pytest.raises(ConfigError, match=r"data\.rrc_scale"):
        load_config(overrides=["data.rrc_scale=[0.0,1.0]"])
    # a range is two values, low first (the type says tuple[float, float])
    with pytest.raises(ConfigError, match=r"data\.rrc_scale = \[0\.5\] must have 2 values, got 1"):
        load_config(overrides=["data.rrc_scale=[0.5]"])
    with pytest.raises(
        ConfigError, match=r"data\.rrc_ratio = \[1\.5, 0\.5\] must be a range \[low, high\] with low <= high"
    ):
        load_config(overrides=["data.rrc_ratio=[1.5,0.5]"])
    assert load_config(overrides=["eval.iou_thresholds=[50]"]).eval.iou_thresholds == (
        50,
    )  # tuple[int, ...]: any length
    with pytest.raises(ConfigError, match=r"data\.verify"):
        load_config(overrides=["data.verify=sometimes"])
