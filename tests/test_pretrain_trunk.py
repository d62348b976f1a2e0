"""The ImageNet proxy of issue 16: the disjoint many-class task, the exported trunk, and
`wsol-pretrain-trunk` end to end (real Ray Train, real MLflow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_job import TEST_WORKERS

from wsol_core.checkpoint import TrainingState, save_training_state
from wsol_core.commands import pretrain_trunk
from wsol_core.commands.pretrain_trunk import RECIPE, TaskOptions, trunk_key
from wsol_core.config import load_config, to_dict
from wsol_core.data.synthetic import SyntheticWSOL
from wsol_core.data.synthetic_pretrain import (
    MAX_CLASSES,
    PALETTES,
    SHAPES,
    TEXTURES,
    PretrainTaskConfig,
    SyntheticPretrainTask,
    class_parts,
    shape_mask,
)
from wsol_core.methods import build_method
from wsol_core.models import VGG16, PretrainedMismatchError, TinyCNN, load_pretrained
from wsol_core.models.export import export_trunk

REPO = Path(__file__).resolve().parents[1]


# -- the task -------------------------------------------------------------------------------------


def test_every_class_is_its_own_shape_texture_and_palette():
    parts = [class_parts(k) for k in range(MAX_CLASSES)]
    assert MAX_CLASSES == 120 and len(set(parts)) == 120  # >= 100 classes (the issue), all distinct
    assert {p[0] for p in parts} == set(SHAPES) and {p[1] for p in parts} == set(TEXTURES)
    assert {p[2] for p in parts} == set(PALETTES)
    assert {class_parts(k)[0] for k in range(8)} == set(SHAPES)  # a small task still has every shape


def test_shapes_differ_from_each_other_and_from_an_ellipse():
    v, u = np.mgrid[-1.2:1.2:97j, -1.2:1.2:97j]
    masks = {name: shape_mask(name, u, v) for name in SHAPES}
    ellipse = u**2 + (v / 0.6) ** 2 <= 1  # the WSOL benchmark's body
    for name, mask in masks.items():
        assert 0.05 < mask.mean() < 0.7, name
        assert (mask ^ ellipse).mean() > 0.05, f"{name} is nearly the benchmark's ellipse"
        for other, other_mask in masks.items():
            if other != name:
                assert (mask ^ other_mask).mean() > 0.03, (name, other)


def test_samples_are_deterministic_balanced_and_boxed_by_their_mask():
    task = SyntheticPretrainTask(PretrainTaskConfig(size=64, num_classes=24), seed=3)
    a, b = task.sample("train", 17), task.sample("train", 17)
    assert np.array_equal(a.image, b.image) and a.box == b.box and a.label == 17 % 24
    assert not np.array_equal(a.image, task.sample("val", 17).image)  # splits draw apart
    for index in range(48):
        sample = task.sample("train", index)
        ys, xs = np.nonzero(sample.mask)
        assert sample.box == (xs.min(), ys.min(), xs.max(), ys.max())
        side = max(sample.box[2] - sample.box[0], sample.box[3] - sample.box[1]) + 1
        assert side >= 0.2 * 64, (index, sample.box)
    # Never the benchmark's pictures: the same seed and index give other images.
    wsol = SyntheticWSOL(seed=3).sample("train", 17).image
    assert wsol.shape != a.image.shape or not np.array_equal(wsol, a.image)


def test_the_task_refuses_impossible_options():
    with pytest.raises(ValueError, match=r"classes 121 must be in \[2, 120\]"):
        PretrainTaskConfig(num_classes=121)
    with pytest.raises(ValueError, match="size 16 must be >= 32"):
        PretrainTaskConfig(size=16)


# -- the exported trunk ---------------------------------------------------------------------------


def _checkpoint(tmp_path: Path, backbone: str = "tiny") -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = load_config(base=RECIPE | {"model": {"backbone": backbone}})
    trained = build_method(cfg, num_classes=120)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # unlike any fresh initialization
    ckpt = tmp_path / "checkpoint_000008"
    ckpt.mkdir()
    save_training_state(
        ckpt, TrainingState(epoch=8, model=trained.state_dict(), optimizer={}, scheduler={}, config=to_dict(cfg))
    )
    return ckpt, trained


def test_the_trunk_is_exported_in_torchvision_form_and_loads_like_imagenet_weights(tmp_path):
    ckpt, trained = _checkpoint(tmp_path)
    out = tmp_path / "trunks" / "tiny.pth"
    state = export_trunk(ckpt, out)
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    saved = torch.load(out, weights_only=True)
    assert set(saved) == set(state)
    assert not any(k.startswith(("backbone.", "module.", "conv6.", "head.")) for k in saved)
    torch.testing.assert_close(saved["fc.weight"], trained.head.fc.weight.detach())
    torch.testing.assert_close(saved["block1.0.weight"], trained.backbone.block1[0].weight.detach())

    fresh = TinyCNN()
    conv6_before = fresh.conv6[0].weight.detach().clone()
    report = load_pretrained(fresh, out)
    assert report.dropped == ["fc.bias", "fc.weight"]  # the pretraining classifier, as ResNet's fc
    assert report.fresh == ["conv6.0.bias", "conv6.0.weight"]  # the protocol's new layer
    for key, value in trained.backbone.state_dict().items():
        if not key.startswith("conv6."):
            torch.testing.assert_close(fresh.state_dict()[key], value)
    torch.testing.assert_close(fresh.conv6[0].weight, conv6_before)  # left at its initialization

    # Through the config, as a fine-tuning run takes it.
    method = build_method(load_config(overrides=["method.name=fmcg", f"model.pretrained={out}"]), num_classes=10)
    torch.testing.assert_close(method.backbone.block3[0].weight, trained.backbone.block3[0].weight.detach())

    narrow = TinyCNN(width=16)
    with pytest.raises(PretrainedMismatchError, match="shape mismatch"):
        load_pretrained(narrow, out)


def test_a_vgg_trunk_leaves_its_classifier_and_conv6_out(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, backbone="vgg16")
    state = export_trunk(ckpt, tmp_path / "vgg.pth")
    assert state and not any(k.startswith(("conv6.", "fc.", "classifier.")) for k in state)
    report = load_pretrained(VGG16(), tmp_path / "vgg.pth")
    assert report.dropped == [] and report.fresh and all(k.startswith("conv6.") for k in report.fresh)


def test_the_key_follows_the_weights_not_the_run(tmp_path):
    task = TaskOptions()
    base = load_config(base=RECIPE)
    key = trunk_key(task, base)
    moved = load_config(base=RECIPE, overrides=["run.name=elsewhere", f"run.storage_path={tmp_path}"])
    assert trunk_key(task, moved) == key
    assert trunk_key(task, load_config(base=RECIPE, overrides=["optim.lr=0.01"])) != key
    assert trunk_key(task, load_config(base=RECIPE, overrides=["train.seed=1"])) != key
    assert trunk_key(TaskOptions(per_class=10), base) != key


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    for argv, message in (
        (["--classes", "500"], "classes 500 must be in [2, 120]"),
        (["--per-class", "0"], "--per-class, --val-per-class and --test-per-class must be at least 1"),
        (["--set", "optim.lr=-1"], "optim.lr"),
    ):
        with pytest.raises(SystemExit) as stop:
            pretrain_trunk.main([*argv, "--cache-dir", str(tmp_path)])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing generated


def test_a_trunk_with_its_key_is_not_trained_again(tmp_path, monkeypatch, capsys):
    import wsol_core.train.driver as driver

    monkeypatch.setattr(driver, "run_training", lambda *a, **k: pytest.fail("trained again"))
    key = trunk_key(TaskOptions(), load_config(base=RECIPE))
    out = tmp_path / "trunks" / f"tiny-{key}.pth"
    out.parent.mkdir()
    out.write_bytes(b"weights")
    out.with_suffix(".json").write_text(json.dumps({"key": key}))
    assert pretrain_trunk.main(["--cache-dir", str(tmp_path)]) == 0
    assert f"trunk already pretrained (key {key}): {out}" in capsys.readouterr().out
    out.with_suffix(".json").write_text(json.dumps({"key": "another"}))  # a card of other weights: not trusted
    monkeypatch.setattr(pretrain_trunk, "ensure_task", lambda task, root: tmp_path / "shards")
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        pretrain_trunk.main(["--cache-dir", str(tmp_path)])


@pytest.mark.integration
def test_pretraining_command_trains_exports_and_is_then_found_in_the_cache(tmp_path, ray_head):
    from test_train_job import job_env, used_ray

    command = [
        sys.executable,
        str(REPO / "jobs" / "pretrain_trunk.py"),
        "--classes",
        "16",
        "--per-class",
        "4",
        "--val-per-class",
        "1",
        "--test-per-class",
        "1",
        "--size",
        "64",
        "--epochs",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        "data.resize_size=64",
        "--set",
        "data.crop_size=56",
        "--set",
        "data.batch_size=8",
        "--set",
        f"run.num_workers={TEST_WORKERS}",
    ]
    first = subprocess.run(command, cwd=tmp_path, env=job_env(ray_head), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (trunk,) = (tmp_path / "cache" / "trunks").glob("tiny-*.pth")
    card = json.loads(trunk.with_suffix(".json").read_text())
    assert card["task"]["classes"] == 16 and card["recipe"]["method.name"] == "cam"
    assert card["recipe"]["model.pretrained"] is None and card["val_top1_acc"] is not None
    assert f"--pretrained {trunk}" in first.stdout
    report = load_pretrained(TinyCNN(), trunk)
    assert len(report.loaded) == 30 and report.fresh == ["conv6.0.bias", "conv6.0.weight"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic-pretrain").experiment_id])
    assert run.info.status == "FINISHED" and "val/top1_acc" in run.data.metrics

    again = subprocess.run(command, cwd=tmp_path, env=job_env(ray_head), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "trunk already pretrained" in again.stdout
    assert not used_ray(again.stdout + again.stderr)
