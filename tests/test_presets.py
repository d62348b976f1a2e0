"""Presets are recipes: each states its learning rate, batch, epochs, schedule and map size
itself (never the generic defaults), and the values a paper or its released code fixes are the
ones the preset carries."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from wsol_core.config import load_config, preset_names

PRESETS = preset_names()
RECIPE_KEYS = (
    "optim.lr",
    "optim.weight_decay",
    "optim.schedule",
    "data.batch_size",
    "train.epochs",
    "model.large_feature_map",
)


def _raw(name: str) -> dict:
    return yaml.safe_load(resources.files("wsol_core.presets").joinpath(f"{name}.yaml").read_text())


def _get(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_there_are_presets_for_every_method():
    assert {name.split("_")[0] for name in PRESETS} == {"fmcg", "icl", "caml", "c2am", "regressor"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_states_its_recipe(name):
    raw = _raw(name)
    missing = []
    for key in RECIPE_KEYS:
        try:
            _get(raw, key)
        except KeyError:
            missing.append(key)
    schedule = raw.get("optim", {}).get("schedule")
    if schedule == "step" and "lr_decay_every" not in raw.get("optim", {}):
        missing.append("optim.lr_decay_every")
    if schedule == "poly" and "poly_power" not in raw.get("optim", {}):
        missing.append("optim.poly_power")
    if name.startswith("fmcg"):
        for key in ("method.srd.schedule_fraction", "method.cg.threshold_mode", "method.inference_map"):
            try:
                _get(raw, key)
            except KeyError:
                missing.append(key)
    assert not missing, f"preset {name} leaves {missing} to the generic defaults"
    cfg = load_config([name])  # and it validates
    assert cfg.model.pretrained == "torchvision"


@pytest.mark.parametrize(
    "name, lr, epochs, decay, large",
    [  # the evaluation protocol's searched CAM recipe per backbone and dataset
        ("fmcg_vgg16_cub", 1.268269e-5, 50, 15, False),
        ("fmcg_vgg16_imagenet", 1.654502e-5, 10, 3, False),
        ("fmcg_resnet50_cub", 2.3222617e-4, 50, 15, True),
        ("fmcg_resnet50_imagenet", 3.108411e-5, 10, 3, True),
        ("fmcg_inception_v3_cub", 2.24844746e-3, 50, 15, True),
        ("fmcg_inception_v3_imagenet", 3.606503e-4, 10, 3, True),
        ("icl_vgg16_cub", 1.268269e-5, 50, 15, False),
    ],
)
def test_supervised_presets_use_the_protocol_recipe(name, lr, epochs, decay, large):
    cfg = load_config([name])
    assert cfg.optim.lr == pytest.approx(lr) and cfg.optim.head_lr_mult == 10.0
    assert (cfg.train.epochs, cfg.optim.lr_decay_every, cfg.model.large_feature_map) == (epochs, decay, large)
    assert cfg.data.batch_size == 32
    if name.startswith("fmcg"):  # the SRD ramp ends with the first learning-rate phase
        assert cfg.method.srd.schedule_fraction == pytest.approx(decay / epochs)


def test_caml_presets_follow_sec_4():
    for name in ("caml_vgg16_cub", "caml_resnet50_cub"):
        cfg = load_config([name])
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.data.batch_size) == (0.001, 0.9, 32)  # 64 on 2 workers
        assert (cfg.method.caml.theta_bg, cfg.method.caml.margin) == (2.3, 1.0)
        assert cfg.train.epochs >= 100  # "approximately three hours" on two GPUs, not 4 epochs


def test_c2am_cub_preset_reproduces_the_released_recipe():
    cfg = load_config(["c2am_resnet50_cub"])
    steps = 5994 // (cfg.data.batch_size * cfg.run.num_workers) * cfg.train.epochs
    assert steps == 7480  # 5,994 // 16 x 20 on one GPU
    assert (cfg.optim.schedule, cfg.optim.poly_power, cfg.optim.momentum) == ("poly", 0.9, 1e-4)
    assert (cfg.method.orientation_check, cfg.method.orientation_images) == ("epoch_end", 1)


def test_regressor_preset_reproduces_psols_released_recipe():
    """CVI-SZU/CCAM WSOL/PSOL: training_CUB.py and models/models.py (module docstring of
    wsol_core/methods/regressor.py)."""
    cfg = load_config(["regressor_resnet50_cub"])
    assert (cfg.method.name, cfg.method.hidden, cfg.method.loss_weight, cfg.method.loss) == (
        "regressor",
        512,
        50.0,
        "mse",
    )
    assert (cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.momentum, cfg.optim.weight_decay) == (0.002, 2.0, 0.9, 1e-4)
    assert (cfg.optim.schedule, cfg.train.epochs, cfg.data.batch_size * cfg.run.num_workers) == ("cosine", 100, 64)
    assert cfg.data.random_resized_crop and cfg.data.rrc_scale == (0.2, 1.0) and cfg.data.hflip
    assert cfg.data.pseudo_boxes == "train.pseudo_boxes"


def test_poly_schedule_matches_the_released_poly_optimizer():
    """CCAM's PolyOptimizer: lr x (1 - step / max_step) ** 0.9 at each step; the step schedule
    is the protocol's x0.1 every lr_decay_every epochs."""
    import torch

    from wsol_core.config import OptimConfig
    from wsol_core.train.optim import build_scheduler, lr_factor

    poly = OptimConfig(schedule="poly", poly_power=0.9)
    steps_per_epoch, epochs = 10, 2
    for step in (0, 1, 7, 19):
        assert lr_factor(step, steps_per_epoch, poly, epochs) == pytest.approx((1 - step / 20) ** 0.9)
    assert lr_factor(20, steps_per_epoch, poly, epochs) == 0.0
    cosine = OptimConfig(schedule="cosine")  # PSOL's CosineAnnealingLR over every step of the run
    expected = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), T_max=steps_per_epoch * epochs
    )
    for step in range(steps_per_epoch * epochs + 1):
        assert lr_factor(step, steps_per_epoch, cosine, epochs) == pytest.approx(expected.get_last_lr()[0], abs=1e-12)
        expected.optimizer.step()
        expected.step()
    step_cfg = OptimConfig(lr_decay_every=3, lr_decay_factor=0.1)
    assert [lr_factor(e * 10, 10, step_cfg) for e in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="epochs"):
        build_scheduler(opt, poly, steps_per_epoch)


def test_the_wheel_ships_the_presets_and_the_search_spaces(tmp_path):
    """The library reads both from its own package directory, so an installed wheel must carry them."""
    import shutil
    import subprocess
    import zipfile
    from pathlib import Path

    uv = shutil.which("uv")
    assert uv, "uv builds the wheel (the README's setup installs it)"
    root = Path(__file__).resolve().parents[1]
    # sdist first, then the wheel from it (as pip does): the source tree gets no build/ folder
    subprocess.run([uv, "build", "--out-dir", str(tmp_path), str(root)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("wsol-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("presets", "spaces"):
        shipped = {n for n in names if n.startswith(f"wsol_core/{folder}/") and n.endswith(".yaml")}
        expected = {f"wsol_core/{folder}/{p.name}" for p in (root / "wsol_core" / folder).glob("*.yaml")}
        assert expected and shipped == expected, (folder, expected - shipped)
