"""Hyperparameter search with Ray Tune (TPE + ASHA), recorded in MLflow.

``tune/search_srd.py`` (``wsol-search``) is the command line. The space is
:mod:`wsol_core.experiments.space`; the steps every experiment shares (parent run,
restore-or-new, fit, interrupted check) and the trial body are :mod:`wsol_core.experiments.trials`;
the top-trials table and the score-vs-parameter plot are :mod:`wsol_core.experiments.summary`.

- **Selection.** TPE (Optuna through Ray Tune) behind a concurrency limit, ASHA on ``val/score``
  (max; val MaxBoxAccV2, or val PxAP on a dataset with masks only) with ``epoch`` as its time
  axis. Train's per-epoch reports reach Tune through ``TuneReportCallback``. Only val figures are
  used to rank: ``test/*`` keys never enter the ranking, the table or the plot (trials run with
  ``train.evaluate_test=false``).
- **MLflow.** One parent run per search (its space and settings as params and ``space.yaml``), one
  nested child run per trial (tag ``mlflow.parentRunId``) that the loop logs into; at the end the
  parent gets ``top_trials.json`` (a table), ``score_vs_params.png`` and ``best_config.yaml``.
- **Resume.** The search lives in ``<storage>/<name>``; the same command restores it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wsol_core.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict
from wsol_core.experiments.space import SearchSpace, validate_space
from wsol_core.experiments.summary import record_summary
from wsol_core.experiments.trials import (
    TIME_ATTR,
    Experiment,
    TrialSetup,
    child_runs,
    derive_max_concurrent,
    train_in_trial,
    trial_trainable,
)

METRIC = "val/score"  # the training loop's SCORE_KEY: val MaxBoxAccV2 (val PxAP on mask-only data)
MODE = "max"


@dataclass
class SearchSettings:
    name: str = "srd-search"
    storage_path: str = ""
    num_samples: int = 8
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent_trials: int = 0  # 0: derived from the cluster's CPUs (or GPUs) per trial
    tpe_startup_trials: int = 0  # 0: a third of the trials, at least 2
    seed: int = 0
    top_k: int = 5

    def validate(self, epochs: int) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples = {self.num_samples} must be at least 1")
        if self.grace_period < 1:
            raise ConfigError(f"--grace-period = {self.grace_period} must be at least 1 epoch")
        if self.grace_period > epochs:
            raise ConfigError(
                f"--grace-period = {self.grace_period} is longer than train.epochs = {epochs}: ASHA could never stop a trial"
            )
        if not self.reduction_factor > 1:
            raise ConfigError(f"--reduction-factor = {self.reduction_factor} must be above 1")
        if self.max_concurrent_trials < 0:
            raise ConfigError(
                f"--max-concurrent-trials = {self.max_concurrent_trials} must be >= 0 (0 derives it from the resources)"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"--name {self.name!r} must be a non-empty name without '/'")


@dataclass
class SearchOutcome:
    name: str
    path: str
    restored: bool
    parent_run_id: str
    tracking_uri: str
    experiment: str
    best_params: dict[str, Any]
    best_score: float
    best_config_path: str
    trials: list[dict[str, Any]]

    @property
    def early_stopped(self) -> list[dict[str, Any]]:
        return [t for t in self.trials if t["status"] == "early_stopped"]


def run_search(
    cfg: Config, space: SearchSpace, settings: SearchSettings, *, ray_address: str | None = None
) -> SearchOutcome:
    """Validate, start (or restore) the Tune experiment, record it in MLflow, export the best."""
    if cfg.method.name != space.method:
        raise ConfigError(f"the space is for {space.method!r} but method.name = {cfg.method.name!r}")
    settings.validate(cfg.train.epochs)
    validate_space(space, cfg)
    if not space.searched:
        raise ConfigError("search space: every parameter is pinned; nothing to search")

    exp = Experiment.open(
        cfg,
        settings.name,
        settings.storage_path,
        "search",
        "search",
        {"wsol.method": space.method, "wsol.search": "true"},
    )
    parent = exp.parent
    fixed = load_config(base=to_dict(cfg), overrides=space.overrides({}))  # the pinned values applied
    parent.log_params(
        {
            **{f"space.{n}": p.describe() for n, p in space.params.items()},
            **{f"search.{k}": v for k, v in dataclasses.asdict(settings).items() if k != "storage_path"},
            "search.metric": METRIC,
            "search.mode": MODE,
            "search.algorithm": "TPE (Optuna) + ASHA",
            **flatten(fixed),
        }
    )
    parent.log_text(yaml.safe_dump(space.to_dict(), sort_keys=False), "space.yaml")
    parent.log_text(dump_yaml(fixed), "base_config.yaml")

    from wsol_core.train.ray_session import init_ray

    init_ray(ray_address)
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    max_concurrent = derive_max_concurrent(cfg, ray.cluster_resources(), settings.max_concurrent_trials)
    parent.log_params({"search.max_concurrent_trials_used": max_concurrent})
    trainable = trial_trainable(run_trial, exp.trial_setup(fixed), space=space)

    def new_tuner():
        import optuna

        startup = settings.tpe_startup_trials or max(2, settings.num_samples // 3)
        searcher = OptunaSearch(
            space={n: p.to_tune() for n, p in space.searched.items()},
            metric=METRIC,
            mode=MODE,
            sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup),
        )
        scheduler = ASHAScheduler(
            time_attr=TIME_ATTR,
            max_t=cfg.train.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=max_concurrent,
            ),
            run_config=tune.RunConfig(name=settings.name, storage_path=exp.storage, verbose=1),
        )

    print(
        f"[wsol] search {settings.name!r}: MLflow parent run {exp.parent_run_id} ({'resumed' if exp.parent_resumed else 'new'}); "
        f"{settings.num_samples} trials, up to {max_concurrent} at a time",
        flush=True,
    )
    results, restored = exp.run(trainable, new_tuner)
    exp.stop_if_interrupted(results, settings.num_samples)
    trials = collect_trials(results, space, cfg.train.epochs)
    close_child_runs(exp, trials)
    ranked = sorted((t for t in trials if t["score"] is not None), key=lambda t: -t["score"])
    if not ranked:
        parent.finish("FAILED")
        raise RuntimeError(f"no trial reported {METRIC}; see the trial errors in {exp.directory}")
    best = ranked[0]
    best_cfg = load_config(base=to_dict(fixed), overrides=space.overrides(best["params"]))
    best_cfg.run.name = ""  # a fresh training run, not a resume of a trial
    best_path = exp.directory / "best_config.yaml"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    best_path.write_text(
        f"# Best of search {settings.name!r} by {METRIC} (val split), trial {best['trial_id']}: {best['score']:.3f}\n"
        f"# Train it with: python jobs/train_imagenet.py --config {best_path}\n" + dump_yaml(best_cfg)
    )
    record_summary(parent, ranked[: settings.top_k], trials, space, best_path, best, METRIC)
    parent.finish("FINISHED")
    return SearchOutcome(
        name=settings.name,
        path=str(exp.directory),
        restored=restored,
        parent_run_id=exp.parent_run_id,
        tracking_uri=exp.tracking_uri,
        experiment=exp.experiment,
        best_params=best["params"],
        best_score=best["score"],
        best_config_path=str(best_path),
        trials=trials,
    )


def run_trial(config: dict[str, Any], setup: TrialSetup, space: SearchSpace) -> None:
    """One Tune trial: ``config`` is the sample (short names), trained with the training job's loop.

    The trial's MLflow child run is keyed by the trial id, so a restored trial logs into the same
    run, and its Train run name is the trial id, so it resumes from its own latest checkpoint.
    """
    import ray.tune

    sample = {k: config[k] for k in space.searched}
    cfg = load_config(base=to_dict(setup.config), overrides=[*space.overrides(sample), "train.evaluate_test=false"])
    train_in_trial(
        cfg,
        setup,
        run_name=ray.tune.get_context().get_trial_name(),
        tags={"wsol.method": cfg.method.name},
        extra_params={f"search.{k}": v for k, v in sample.items()},
    )


def collect_trials(results, space: SearchSpace, epochs: int) -> list[dict[str, Any]]:
    """Per trial: sample, best val score over its epochs, epochs run, status. Test keys dropped."""
    trials = []
    for result in results:
        history = result.metrics_dataframe
        score, done = None, 0
        if history is not None and METRIC in history and len(history):
            column = history[METRIC]
            column = column[column >= 0]  # -1 marks "not evaluated yet"
            score = float(column.max()) if len(column) else None
            done = int(history[TIME_ATTR].max()) if TIME_ATTR in history else 0
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        params = {k: result.config[k] for k in space.searched if k in result.config}
        if result.error is not None:
            status = "error"
        elif done >= epochs:
            status = "completed"
        elif done > 0:
            status = "early_stopped"
        else:
            status = "not_run"
        trials.append(
            {
                "trial_id": trial_id,
                "params": params,
                "score": score,
                "epochs": done,
                "status": status,
                "path": result.path,
            }
        )
    return trials


def close_child_runs(exp: Experiment, trials: list[dict[str, Any]]) -> None:
    """Trials ASHA stopped were killed mid-fit: close their child runs and tag how they ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(exp.tracking_uri)
    runs = child_runs(exp.tracking_uri, exp.experiment, exp.parent_run_id, max_results=1000)
    by_trial = {r.data.tags.get("wsol.search.trial_id"): r for r in runs}
    for trial in trials:
        run = by_trial.get(str(trial["trial_id"]))
        if run is None:
            continue
        trial["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "wsol.search.status", trial["status"])
        client.set_tag(run.info.run_id, "wsol.search.epochs", str(trial["epochs"]))
        if run.info.status == "RUNNING":
            client.set_terminated(
                run.info.run_id,
                status="FAILED"
                if trial["status"] == "error"
                else ("KILLED" if trial["status"] == "early_stopped" else "FINISHED"),
            )


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
