"""The hyperparameter search (wsol_core/experiments, tune/search_srd.py).

Unit tests check the space and its errors (no Ray); the integration tests run real Ray Tune and
MLflow on tiny synthetic data: one search, interrupted and restored by the same command, then
checked end to end: ASHA stopping a trial, nested runs read back through the MLflow client, the
best-config YAML accepted by the training job's config loader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_job import TEST_WORKERS

from wsol_core.config import ConfigError, load_config, read_yaml
from wsol_core.experiments.search import METRIC, SearchSettings
from wsol_core.experiments.space import embedded_base, load_space, validate_space
from wsol_core.experiments.trials import derive_max_concurrent

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tune" / "search_srd.py"


def _base(method: str = "fmcg"):
    return load_config(base=embedded_base(), overrides=[f"method.name={method}"])


# ---------------------------------------------------------------------------------------------
# Space (no Ray)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, names",
    [
        ("fmcg", {"theta_drop", "S", "tau_fg", "tau_bg", "margin"}),
        ("icl", {"theta_drop", "S", "tau_fg", "tau_bg", "margin"}),
        ("caml", {"margin"}),
        ("c2am", {"alpha"}),
    ],
)
def test_default_spaces_are_valid(method, names):
    space = load_space(method)
    assert set(space.searched) == names
    validate_space(space, _base(method))


def test_params_pin_and_override():
    space = load_space("fmcg", params=["theta_drop=0.6:0.9", "S=3,5", "margin=1.5"])
    assert space.params["theta_drop"].low == 0.6 and space.params["S"].values == [3, 5]
    assert space.pinned == {"margin": 1.5}
    assert "method.cg.margin=1.5" in space.overrides({})
    cfg = load_config(
        base=embedded_base(), overrides=space.overrides({"theta_drop": 0.7, "S": 5, "tau_fg": 0.9, "tau_bg": 0.3})
    )
    assert (cfg.method.srd.theta_drop, cfg.method.srd.kernel_size, cfg.method.cg.margin) == (0.7, 5, 1.5)


def test_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("method: fmcg\nparams:\n  S: 3\n  theta_drop: {type: uniform, low: 0.6, high: 0.7}\n")
    space = load_space("fmcg", [path])
    assert space.pinned == {"S": 3} and space.params["theta_drop"].high == 0.7


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("fmcg", ["theta_drop=0.9:0.5"], "empty"),
        ("fmcg", ["margin=1.0:1.0"], "empty"),
        ("fmcg", ["S=3,4"], "odd"),
        ("fmcg", ["S=2"], "odd"),
        ("fmcg", ["tau_fg=0.8", "tau_bg=0.85"], "tau_bg"),
        ("fmcg", ["tau_bg=0.5:0.8"], "tau_bg"),
        ("fmcg", ["alpha=0.5"], "not used by method 'fmcg'"),
        ("c2am", ["margin=0.5:1"], "not used by method 'c2am'"),
        ("fmcg", ["gamma=1"], "unknown parameter"),
        ("fmcg", ["theta_drop=0.5:1.5"], "outside the allowed range"),
    ],
)
def test_bad_space_fails_clearly(method, params, match):
    with pytest.raises(ConfigError, match=match):
        validate_space(load_space(method, params=params), _base(method))


@pytest.mark.integration
def test_bad_space_exits_before_ray(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--param",
            "S=4",
            "--storage-path",
            str(tmp_path / "ray"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "S = 4 must be an odd" in out.stderr
    assert not (tmp_path / "ray").exists() and "ray.init" not in out.stderr


def test_settings_and_concurrency():
    with pytest.raises(ConfigError, match="grace-period"):
        SearchSettings(grace_period=5).validate(epochs=3)
    cfg = _base()
    assert derive_max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert derive_max_concurrent(cfg, {"CPU": 8.0}, requested=3) == 3
    cfg2 = load_config(base=embedded_base(), overrides=["run.num_workers=2"])
    assert derive_max_concurrent(cfg2, {"CPU": 2.0}) == 1


# ---------------------------------------------------------------------------------------------
# Real Ray Tune + MLflow
# ---------------------------------------------------------------------------------------------

TINY = [
    "--set",
    "data.synthetic.num_train=64",
    "--set",
    "data.synthetic.num_val=32",
    "--set",
    "data.synthetic.num_test=16",
    "--set",
    "data.batch_size=16",
    "--set",
    "eval.num_vis_images=0",
    "--set",
    f"run.num_workers={TEST_WORKERS}",
]


def _command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        *TINY,
        "--epochs",
        "2",
        "--grace-period",
        "1",
        "--reduction-factor",
        "2",
        "--storage-path",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--name",
        "s",
        "--set",
        f"data.synthetic.cache_dir={tmp_path / 'data'}",
        *extra,
    ]


def _env(ray_address: str) -> dict:
    """The pytest worker's shared Ray head (no dashboard). Before the search freed the placement
    groups of stopped trials itself (``wsol_core/experiments/placement_groups.py``), the restored
    search waited forever here on the group of the first trial ASHA stopped: Ray Train's own
    cleaner needs the dashboard's state API (BENCHMARKS.md, "A stopped trial's placement group")."""
    from test_train_job import job_env

    return job_env(ray_address)


def _leftover_cleaners(ray_address: str) -> list[str]:
    """Ray Train cleaners still polling on the head for a controller that is dead, of jobs that
    have ended (``wsol_core.experiments.placement_groups.leftover_cleaners``)."""
    code = (
        "import json, ray; ray.init(); from wsol_core.experiments.placement_groups import "
        "actor_records, ended_jobs, leftover_cleaners as left; "
        "print('RESULT', json.dumps([a.actor_id for a in left(actor_records(), '', ended_jobs())]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(ray_address), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


@pytest.mark.integration
def test_search_interrupted_then_restored_end_to_end(tmp_path, ray_head):
    """One search, cut by Ctrl-C after its first trial's first epoch and restored by the same
    command (a search costs the suite minutes): the restore, then the finished search's nested
    runs, ASHA's early stop, the summary artifacts and the best config."""
    # Four trials, one at a time: the first is cut after its first epoch, the others have not started.
    command = _command(tmp_path, "--num-samples", "4", "--tpe-startup-trials", "2", "--max-concurrent-trials", "1")
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_env(ray_head),
        start_new_session=True,
    )
    state = tmp_path / "ray" / "s"
    deadline = time.time() + 300
    # Interrupt once the first trial has reported an epoch (its result file has a row).
    while time.time() < deadline and proc.poll() is None:
        if any(p.stat().st_size > 0 for p in state.glob("run_trial_*/result.json")):
            break
        time.sleep(2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    first, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, first[-2000:]

    out = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=_env(ray_head))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "restoring the search" in out.stdout and "(restored)" in out.stdout
    best_path = state / "best_config.yaml"
    assert f"best config written to {best_path}" in out.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("wsol.search") == "true"]
    assert len(parents) == 1  # the same parent run, resumed
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4  # no trial started over as a new one
    assert (
        parent.data.params["space.theta_drop"].startswith("uniform") and parent.data.params["search.metric"] == METRIC
    )
    for child in children:
        assert "search.theta_drop" in child.data.params and "method.srd.theta_drop" in child.data.params
        assert float(child.data.params["method.srd.theta_drop"]) == pytest.approx(
            float(child.data.params["search.theta_drop"])
        )
        history = client.get_metric_history(child.info.run_id, METRIC)
        assert history and {m.step for m in history} <= {1, 2}
        assert client.get_metric_history(child.info.run_id, "train/loss")
        assert child.info.status != "RUNNING"
    statuses = [c.data.tags.get("wsol.search.status") for c in children]
    assert "early_stopped" in statuses, statuses  # ASHA stopped at least one trial after epoch 1
    # and the stopped trial's Train placement group was freed for the next trial (on this head
    # without a dashboard, by the search itself)
    assert "freed the placement group" in out.stdout, out.stdout[-3000:]
    # and Ray Train's own cleaners of the dead controllers, which poll forever without the
    # dashboard, were stopped: the cut search's by the restore, the restored search's own as it ran
    assert "stopped Ray Train's placement-group cleaner" in out.stdout, out.stdout[-3000:]
    assert _leftover_cleaners(ray_head) == []
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"top_trials.json", "score_vs_params.png", "best_config.yaml", "space.yaml"} <= artifacts
    assert parent.info.status == "FINISHED"

    # The best config is a training-job config as it is, with the best trial's values.
    cfg = load_config([best_path])
    best_child = max(children, key=lambda c: max(m.value for m in client.get_metric_history(c.info.run_id, METRIC)))
    assert cfg.method.srd.kernel_size == int(best_child.data.params["search.S"])
    # Trials select on val only: no trial ever scored the test split.
    assert not any(key.startswith("test/") for child in children for key in child.data.metrics)
    help_out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_imagenet.py"), "--config", str(best_path), "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "train.epochs = 0" in help_out.stderr  # parsed the file, then rejected only the override
    assert read_yaml(best_path)["method"]["name"] == "fmcg"
