"""Seeded sweeps (wsol_core/experiments/sweep.py) and the ablation benchmark (benchmarks/ablation.py).

Unit tests cover the variant parsing, the settings' errors and the targets' arithmetic; the
integration test runs a real Ray Tune grid (2 variants x 2 seeds) with real MLflow and checks the
JSON's aggregates against the child runs' metrics read back through the MLflow client.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_job import TEST_WORKERS

from benchmarks.ablation import parse_variants, targets
from wsol_core.config import ConfigError, load_config, to_dict
from wsol_core.experiments.sweep import ABLATION_VARIANTS, SweepSettings, variant_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ablation.py"


def test_variants_cover_fmcg_table1_and_every_method():
    base = to_dict(load_config())
    configs = {name: variant_config(base, overrides, seed=7) for name, overrides in ABLATION_VARIANTS.items()}
    assert {c.method.name for c in configs.values()} == {"cam", "fmcg", "icl", "caml", "c2am"}
    fmcg = {name: c.method for name, c in configs.items() if c.method.name == "fmcg"}
    switches = {name: (m.srd.enabled, m.cg.enabled, m.pnl.enabled) for name, m in fmcg.items()}
    assert switches == {
        "fmcg": (True, True, True),
        "fmcg-no-srd": (False, True, True),
        "fmcg-no-cg": (True, False, True),
        "fmcg-no-pnl": (True, True, False),
    }
    assert all(c.train.seed == 7 for c in configs.values())


def test_parse_variants():
    assert list(parse_variants("cam,fmcg", [])) == ["cam", "fmcg"]
    extra = parse_variants("", ["fmcg-t7=method.name=fmcg method.srd.theta_drop=0.7"])
    assert extra["fmcg-t7"] == ["method.name=fmcg", "method.srd.theta_drop=0.7"] and "cam" in extra
    with pytest.raises(ConfigError, match="unknown"):
        parse_variants("cam,nope", [])
    with pytest.raises(ConfigError, match="expected NAME="):
        parse_variants("", ["just-a-name"])


def test_settings_errors_name_the_variant():
    base = load_config()
    SweepSettings("a", {"cam": ["method.name=cam"]}, [0, 1]).validate(base)
    with pytest.raises(ConfigError, match="variant 'bad'.*theta_drop"):
        SweepSettings("a", {"bad": ["method.name=fmcg", "method.srd.theta_drop=3"]}, [0]).validate(base)
    with pytest.raises(ConfigError, match="repeats"):
        SweepSettings("a", {"cam": ["method.name=cam"]}, [1, 1]).validate(base)
    with pytest.raises(ConfigError, match="evaluate_test"):
        SweepSettings("a", {"cam": []}, [0]).validate(load_config(overrides=["train.evaluate_test=false"]))


def _row(v2: float, v2_std: float | None, iou70: float) -> dict:
    return {"maxboxacc_v2": {"mean": v2, "std": v2_std}, "boxacc_v2_iou70": {"mean": iou70, "std": None}}


def test_targets_arithmetic():
    met = targets({"cam": _row(30.0, 1.0, 5.0), "fmcg": _row(37.5, 1.0, 9.0), "c2am": _row(31.0, 0.5, 6.0)})
    assert met["fmcg_over_cam"]["gap_maxboxacc_v2"] == pytest.approx(7.5)
    assert met["fmcg_over_cam"]["gap_beyond_spread"] == pytest.approx(5.5) and met["fmcg_over_cam"]["met"]
    assert met["c2am_over_cam_iou70"] == {
        "gap_boxacc_v2_iou70": pytest.approx(1.0),
        "met": True,
        "judged_on": "textured",
        "applies": False,  # judged on the textured form; this table is the default one
    }
    assert targets({"cam": _row(30.0, 1.0, 5.0), "c2am": _row(31.0, 0.5, 6.0)}, form="upright+textured")[
        "c2am_over_cam_iou70"
    ]["applies"]
    missed = targets({"cam": _row(30.0, 2.0, 5.0), "fmcg": _row(37.5, 1.0, 9.0), "c2am": _row(31.0, 0.5, 4.0)})
    assert not missed["fmcg_over_cam"]["met"] and not missed["c2am_over_cam_iou70"]["met"]
    assert targets({"fmcg": _row(1, 0, 0)}) == {}
    searched = targets({"cam": _row(30.0, 2.0, 5.0), "fmcg-searched": _row(40.0, 1.0, 9.0)})
    assert set(searched) == {"fmcg_searched_over_cam"} and searched["fmcg_searched_over_cam"][
        "gap_beyond_spread"
    ] == pytest.approx(7.0)


@pytest.mark.integration
def test_bad_variant_exits_before_ray(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--variants", "cam,fmcg-typo", "--storage-path", str(tmp_path / "ray")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "fmcg-typo" in out.stderr
    assert not (tmp_path / "ray").exists()


@pytest.mark.integration
def test_ablation_sweep_end_to_end(tmp_path, ray_head):
    from test_train_job import job_env

    out_json = tmp_path / "ablation.json"
    env = job_env(ray_head)
    command = [
        sys.executable,
        str(SCRIPT),
        "--variants",
        "cam,fmcg",
        "--seeds",
        "0,1",
        "--epochs",
        "2",
        "--set",
        "data.synthetic.num_train=64",
        "--set",
        "data.synthetic.num_val=32",
        "--set",
        "data.synthetic.num_test=24",
        "--set",
        "data.synthetic.size=64",
        "--set",
        "data.batch_size=16",
        "--set",
        "eval.num_vis_images=0",
        "--set",
        f"run.num_workers={TEST_WORKERS}",
        "--set",
        f"data.synthetic.cache_dir={tmp_path / 'data'}",
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--out",
        str(out_json),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert set(result["rows"]) == {"cam", "fmcg"} and not result["failed"]
    table_md = out_json.with_suffix(".md").read_text()
    assert table_md.startswith("# Ablation") and "MaxBoxAcc (v1)" in table_md

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["wsol.sweep"] == "true"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")} == {
        "ablation/ablation.md",
        "ablation/ablation_test.csv",
        "ablation/ablation_test_best.csv",
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((c.data.tags["wsol.sweep.variant"], c.data.params["train.seed"]) for c in children) == [
        ("cam", "0"),
        ("cam", "1"),
        ("fmcg", "0"),
        ("fmcg", "1"),
    ]
    for name, row in result["rows"].items():
        runs = [c for c in children if c.data.tags["wsol.sweep.variant"] == name]
        assert sorted(row["run_ids"]) == sorted(c.info.run_id for c in runs)
        for column in ("maxboxacc_v1", "maxboxacc_v2", "boxacc_v2_iou70", "gt_known_loc"):
            values = [c.data.metrics[f"test/{column}"] for c in runs]
            assert row[column]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[column]["std"] == pytest.approx(statistics.stdev(values))
    assert "fmcg_over_cam" in result["targets"]
    # Each run's best-val checkpoint was scored on test: its epoch is an argmax of the val history
    # (ties: either tied epoch, whichever checkpoint Ray Train kept).
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val/maxboxacc_v2")
        top = max(m.value for m in history)
        assert child.data.metrics["test_best/epoch"] in {m.step for m in history if m.value == top}
        if child.data.metrics["test_best/epoch"] == 2:  # the last epoch: the same model as the final test score
            assert child.data.metrics["test_best/maxboxacc_v2"] == pytest.approx(
                child.data.metrics["test/maxboxacc_v2"]
            )
    assert set(result["rows_best_val_checkpoint"]) == {"cam", "fmcg"}
    for name, row in result["rows_best_val_checkpoint"].items():
        runs = [c for c in children if c.data.tags["wsol.sweep.variant"] == name]
        assert row["maxboxacc_v1"]["mean"] == pytest.approx(
            statistics.fmean(c.data.metrics["test_best/maxboxacc_v1"] for c in runs)
        )


def test_variant_from_a_search_best_config_takes_its_method_only(tmp_path):
    from wsol_core.config import dump_yaml

    searched = load_config(
        overrides=[
            "method.name=fmcg",
            "method.srd.theta_drop=0.7",
            "method.srd.kernel_size=5",
            "method.cg.enabled=false",
            "data.synthetic.num_train=256",
            "train.epochs=9",
        ]
    )
    path = tmp_path / "best_config.yaml"
    path.write_text(dump_yaml(searched))
    variants = parse_variants("cam,fmcg-searched", [f"fmcg-searched=@{path}"])
    assert list(variants) == ["cam", "fmcg-searched"]
    base = load_config(overrides=["train.epochs=3"])
    cfg = variant_config(to_dict(base), variants["fmcg-searched"], seed=1)
    assert (cfg.method.srd.theta_drop, cfg.method.srd.kernel_size, cfg.method.cg.enabled) == (0.7, 5, False)
    assert cfg.train.epochs == 3 and cfg.data.synthetic.num_train == base.data.synthetic.num_train
    with pytest.raises(ConfigError, match="no config file"):
        parse_variants("", [f"x=@{tmp_path / 'missing.yaml'}"])
