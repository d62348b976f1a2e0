"""Seeded sweeps: a fixed list of configurations, each trained with several seeds, as one Ray Tune
grid, recorded in MLflow and summarised as the papers' ablation table.

This is how the ablations are run (``benchmarks/ablation.py``): the FMCG paper's Table 1 (the CAM
baseline; FMCG with all of SRD, CG and PNL; FMCG without each in turn) and the other methods,
each with ``n`` seeds. Every (variant, seed) pair is one Tune trial that trains to the end (no
early stopping: the point is to compare finished runs) through the same skeleton and trial body
as the search (:mod:`wsol_core.experiments.trials`), so nothing of the training job is copied.

- **Variants** are named lists of config overrides over one base config (:data:`ABLATION_VARIANTS`).
- **MLflow.** One parent run per sweep, one nested child run per trial (tags ``wsol.sweep.variant``
  and the seed in ``train.seed``); at the end the parent gets ``ablation/ablation.md`` and ``.csv``
  built by :func:`wsol_core.reporting.build_ablation_table` from the finished child runs.
- **Resume.** The sweep lives in ``<storage>/<name>``; the same call restores Tune's experiment
  (finished trials are kept, unfinished ones continue from their Train checkpoints).
- **Selection rule.** Runs are compared on the ``test`` split and no choice is made on it. Every
  variant trains for the same fixed epochs; its last epoch's weights are scored on test during
  training (``test/*``), and after the sweep the checkpoint with the best *val* MaxBoxAccV2 is
  scored on test too (``test_best/*``, wsolevaluation's ``--eval_checkpoint_type best``). The
  two tables sit side by side; the val split alone chooses the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsol_core.config import Config, ConfigError, dump_yaml, flatten, load_config, to_dict
from wsol_core.experiments.trials import (
    Experiment,
    TrialSetup,
    child_runs,
    derive_max_concurrent,
    train_in_trial,
    trial_trainable,
)
from wsol_core.methods import ablation_variants

# The FMCG paper's Table 1 rows (Sec. 4.2: FMCG's ABLATED switches) and the other methods, as
# overrides of one base. FMCG without SRD uses pixel-level erasing at the fixed threshold (the
# paper's note under Table 1).
ABLATION_VARIANTS: dict[str, list[str]] = ablation_variants()
# The protocol's original MaxBoxAcc (v1: largest contour, IoU 0.5) beside V2's components and mean.
REPORT_COLUMNS = (
    "maxboxacc_v1",
    "boxacc_v2_iou30",
    "boxacc_v2_iou50",
    "boxacc_v2_iou70",
    "maxboxacc_v2",
    "gt_known_loc",
    "top1_loc",
)


@dataclass
class SweepSettings:
    name: str
    variants: dict[str, list[str]]
    seeds: list[int]
    storage_path: str = ""
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs fit
    split: str = "test"
    columns: tuple[str, ...] = REPORT_COLUMNS
    # Also score each run's best-val checkpoint on test (wsolevaluation's
    # --eval_checkpoint_type best), logged as test_best/* and tabled beside the last-epoch one.
    score_best_checkpoint: bool = True

    def validate(self, base: Config) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"sweep name {self.name!r} must be a non-empty name without '/'")
        if not self.variants:
            raise ConfigError("a sweep needs at least one variant")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds {self.seeds} must be a non-empty list without repeats")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"max_concurrent_trials = {self.max_concurrent_trials} must be >= 0")
        if self.split == "test" and not base.train.evaluate_test:
            raise ConfigError("the sweep reports the test split but train.evaluate_test = false")
        for name, overrides in self.variants.items():
            try:  # every variant must be a valid config before Ray starts
                load_config(base=to_dict(base), overrides=overrides)
            except ConfigError as err:
                raise ConfigError(f"sweep variant {name!r}: {err}") from None


@dataclass
class SweepOutcome:
    name: str
    path: str
    restored: bool
    parent_run_id: str
    tracking_uri: str
    experiment: str
    run_ids: dict[str, list[str]] = field(default_factory=dict)  # variant -> finished child runs
    failed: list[str] = field(default_factory=list)  # "variant seed N: error"
    markdown: str = ""
    table: Any = None  # reporting.AblationTable
    best_table: Any = None  # the same over test_best/*, when scored


def variant_config(base: dict[str, Any], overrides: list[str], seed: int) -> Config:
    return load_config(base=base, overrides=[*overrides, f"train.seed={seed}"])


def run_sweep_trial(config: dict[str, Any], setup: TrialSetup, variants: dict[str, list[str]]) -> None:
    """One trial of the grid: ``config`` = ``{"variant": name, "seed": n}``."""
    import ray.tune

    variant, seed = config["variant"], int(config["seed"])
    cfg = variant_config(to_dict(setup.config), variants[variant], seed)
    train_in_trial(
        cfg,
        setup,
        run_name=f"{variant}-seed{seed}",
        tags={
            "wsol.method": cfg.method.name,
            "wsol.sweep.variant": variant,
            "wsol.sweep.trial": ray.tune.get_context().get_trial_name(),
        },
        extra_params={"sweep.variant": variant},
    )


def run_sweep(base: Config, settings: SweepSettings, *, ray_address: str | None = None) -> SweepOutcome:
    """Validate, run (or restore) the grid, then build and record the ablation table."""
    settings.validate(base)
    exp = Experiment.open(base, settings.name, settings.storage_path, "sweep", "ablation", {"wsol.sweep": "true"})
    parent = exp.parent
    parent.log_params(
        {
            **{f"variant.{name}": " ".join(o) for name, o in settings.variants.items()},
            "sweep.seeds": ",".join(map(str, settings.seeds)),
            "sweep.split": settings.split,
            **flatten(base),
        }
    )
    parent.log_text(dump_yaml(base), "base_config.yaml")

    from wsol_core.train.ray_session import init_ray

    init_ray(ray_address)
    import ray
    from ray import tune

    # Variants override the method, never run.*: one trial's workers decide how many fit side by side.
    max_concurrent = derive_max_concurrent(base, ray.cluster_resources(), settings.max_concurrent_trials)
    trainable = trial_trainable(run_sweep_trial, exp.trial_setup(base), variants=settings.variants)

    def new_tuner():
        return tune.Tuner(
            trainable,
            # seeds vary fastest, so the first results cover every variant once early on
            param_space={
                "variant": tune.grid_search(list(settings.variants)),
                "seed": tune.grid_search(list(settings.seeds)),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=settings.name, storage_path=exp.storage, verbose=1),
        )

    total = len(settings.variants) * len(settings.seeds)
    print(
        f"[wsol] sweep {settings.name!r}: MLflow parent run {exp.parent_run_id} ({'resumed' if exp.parent_resumed else 'new'}); "
        f"{total} trials ({len(settings.variants)} variants x {len(settings.seeds)} seeds), up to {max_concurrent} at a time",
        flush=True,
    )
    results, restored = exp.run(trainable, new_tuner)
    exp.stop_if_interrupted(results, total)

    outcome = SweepOutcome(
        settings.name, str(exp.directory), restored, exp.parent_run_id, exp.tracking_uri, exp.experiment
    )
    for result in results:
        if result.error is not None:
            outcome.failed.append(
                f"{result.config.get('variant')} seed {result.config.get('seed')}: {type(result.error).__name__}: {result.error}"
            )
    if settings.score_best_checkpoint and settings.split == "test":
        score_best_checkpoints(outcome, exp.directory, exp.data_root, base.eval.cam_curve_interval)
    _report(outcome, settings, parent)
    parent.finish("FINISHED" if not outcome.failed else "FAILED")
    return outcome


BEST_SPLIT = "test_best"  # metric prefix of the best-val checkpoint's test scores


def score_best_checkpoints(outcome: SweepOutcome, sweep_dir: Path, data_root: Path, interval: float) -> None:
    """Score every finished run's best-val checkpoint on the test split, once.

    The protocol's reference code evaluates either the last model or the checkpoint with the best
    val MaxBoxAccV2 (wsolevaluation ``--eval_checkpoint_type last|best``); runs here report the
    last one as ``test/*``. Each trial's Train run keeps its best checkpoint by val MaxBoxAccV2
    (``CheckpointConfig``) beside the latest; that checkpoint is scored here and logged to the
    child run as ``test_best/*`` with ``test_best/epoch``. Runs already scored are skipped, so
    re-running a finished sweep costs nothing; a run whose best checkpoint is missing is skipped
    with a message (its row then counts fewer runs in the best-checkpoint table).
    """
    from mlflow.tracking import MlflowClient

    from wsol_core.checkpoint import load_training_state
    from wsol_core.train.loop import SCORE_KEY
    from wsol_core.train.offline_eval import evaluate_checkpoint

    client = MlflowClient(outcome.tracking_uri)
    runs = child_runs(outcome.tracking_uri, outcome.experiment, outcome.parent_run_id, finished_only=True)
    for run in runs:
        if f"{BEST_SPLIT}/maxboxacc_v2" in run.data.metrics:
            continue
        history = client.get_metric_history(run.info.run_id, SCORE_KEY)
        if not history:
            continue
        train_dir = sweep_dir / "train_runs" / run.data.tags.get("wsol.search.trial_id", "?")
        kept = {load_training_state(d).epoch: d for d in sorted(train_dir.glob("checkpoint_*")) if d.is_dir()}
        # Epochs tied for the best val score are equally "the best checkpoint"; Ray Train keeps
        # one of them (not necessarily the earliest), so take the earliest tied epoch it kept.
        top = max(m.value for m in history)
        tied = sorted(m.step for m in history if m.value == top)
        best_epoch = next((epoch for epoch in tied if epoch in kept), None)
        if best_epoch is None:
            print(
                f"[wsol] {run.info.run_name}: no checkpoint of best val epoch {tied} in {train_dir} (kept: {sorted(kept)}); "
                "best-checkpoint score skipped",
                flush=True,
            )
            continue
        metrics = evaluate_checkpoint(str(kept[best_epoch]), data_root / "test", split="test", interval=interval)
        logged = {f"{BEST_SPLIT}/{k.split('/', 1)[1]}": v for k, v in metrics.items() if k.startswith("test/")}
        client.log_batch(run.info.run_id, metrics=_metric_list({**logged, f"{BEST_SPLIT}/epoch": float(best_epoch)}))
        print(
            f"[wsol] {run.info.run_name}: best val epoch {best_epoch}, test MaxBoxAccV2 {logged[f'{BEST_SPLIT}/maxboxacc_v2']:.2f}",
            flush=True,
        )


def _metric_list(values: dict[str, float]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def _report(outcome: SweepOutcome, settings: SweepSettings, parent) -> None:
    """The ablation table from the sweep's finished child runs, logged into the parent run."""

    from wsol_core.reporting import RunRecord, ablation_csv, ablation_markdown, build_ablation_table

    runs = child_runs(outcome.tracking_uri, outcome.experiment, outcome.parent_run_id, finished_only=True)
    records = [RunRecord.from_mlflow(r) for r in runs]
    for record in records:
        outcome.run_ids.setdefault(record.tags.get("wsol.sweep.variant", "?"), []).append(record.run_id)
    # Group by variant name: it is what differs between rows by construction (seeds and bookkeeping
    # are not), and it keeps two variants with equal params apart if a user defines them.
    table = build_ablation_table(records, split=settings.split, columns=settings.columns, group_by=["sweep.variant"])
    variant_of = {rid: name for name, ids in outcome.run_ids.items() for rid in ids}
    outcome.table = table
    outcome.markdown = ablation_markdown(
        table, title=f"Ablation: sweep {settings.name}, last-epoch model on {settings.split}"
    )
    tables = {settings.split: table}
    if any(f"{BEST_SPLIT}/maxboxacc_v2" in r.metrics for r in records):
        outcome.best_table = build_ablation_table(
            records, split=BEST_SPLIT, columns=settings.columns, group_by=["sweep.variant"]
        )
        tables[BEST_SPLIT] = outcome.best_table
        outcome.markdown += "\n\n" + ablation_markdown(
            outcome.best_table,
            title=f"Ablation: sweep {settings.name}, best-val checkpoint on test",
            paper_reference=False,
        )
    parent.log_text(outcome.markdown, "ablation/ablation.md")
    metrics = {}
    for split, tab in tables.items():
        parent.log_text(ablation_csv(tab), f"ablation/ablation_{split}.csv")
        for row in tab.rows:
            name = variant_of.get(row.run_ids[0], row.label)
            for column in settings.columns:
                if row.mean.get(column) is not None:
                    metrics[f"{name}/{split}/{column}_mean"] = row.mean[column]
                if row.std.get(column) is not None:
                    metrics[f"{name}/{split}/{column}_std"] = row.std[column]
    parent.log_metrics(metrics, step=0)
