"""What a search and a seeded sweep share: one skeleton, one trial body.

Both are a Ray Tune experiment whose trials are training runs of the training job's own loop, and
both go through the same steps (:class:`Experiment`):

1. **Open**: check the data before Ray starts, and find or start the MLflow parent run, keyed by
   the experiment's folder ``<storage>/<name>``.
2. **Restore or new**: the same command finds Tune's experiment state in that folder and restores
   it (finished trials are kept, unfinished ones continue from their Train checkpoints, in the same
   child runs), or builds a new ``Tuner``.
3. **Fit**: the parent run is closed as KILLED / FAILED if the fit is cut short.
4. **Interrupted?** Tune returns normally on Ctrl-C with unfinished trials; the parent is then
   KILLED and a ``KeyboardInterrupt`` says how to resume.

Each trial runs :func:`train_in_trial`: a nested MLflow child run keyed by the trial id, and the
trainer of :mod:`wsol_core.train.trainer` with ``TuneReportCallback`` (the pattern Ray 2.60
documents for Train V2 inside Tune, also for one worker: the loop needs a Train context).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsol_core.config import Config, flatten
from wsol_core.tracking import RunLogger
from wsol_core.train.context import RunContext, RunPlacement, resources_per_worker

#: The epoch counter every training report carries: ASHA's time axis, and how a trial that never
#: reported is told apart from one that did.
TIME_ATTR = "epoch"


@dataclass(frozen=True)
class TrialSetup:
    """The fixed context of every trial of one experiment, handed to each trial whole
    (``tune.with_parameters``); the trial's own part (its sample, or its variant and seed) is
    Tune's ``config``."""

    config: Config  # the experiment's base config (a search's pinned values applied)
    data_root: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    directory: Path  # the Tune experiment's folder: the parent run's key, which the child runs' keys extend

    @property
    def train_storage(self) -> str:
        return str(self.directory / "train_runs")


@dataclass
class Experiment:
    """One search or sweep: its folder, its data, and its MLflow parent run."""

    name: str
    storage: str
    data_root: Path
    tracking_uri: str
    experiment: str
    parent: RunLogger
    parent_resumed: bool
    what: str = "experiment"  # "search" or "sweep", for messages

    @property
    def directory(self) -> Path:
        return Path(self.storage) / self.name

    @property
    def parent_run_id(self) -> str:
        return self.parent.run_id

    @classmethod
    def open(cls, cfg: Config, name: str, storage_path: str, what: str, kind: str, tags: dict[str, str]) -> Experiment:
        """Check the data and find or start the parent run of the ``what`` (search, sweep) called
        ``name``. Its MLflow experiment is ``run.experiment``, or ``<dataset>-<kind>``."""
        from wsol_core.data.resolve import resolve_data_root
        from wsol_core.tracking import git_commit, resolve_tracking_uri, start_or_resume_run
        from wsol_core.train.preflight import check_data, check_pseudo_boxes, default_storage_path

        storage = str(Path(storage_path or cfg.run.storage_path or default_storage_path()).resolve())
        data_root = resolve_data_root(cfg.data)
        data = check_data(data_root)
        check_pseudo_boxes(cfg, data_root)  # a regressor's sidecar, before any trial starts
        tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
        experiment = cfg.run.experiment or f"{data['dataset']}-{kind}"
        parent_id, resumed = start_or_resume_run(
            tracking_uri,
            experiment,
            str(Path(storage) / name),
            run_name=name,
            tags={"mlflow.source.git.commit": git_commit(), **tags},
        )
        return cls(
            name, storage, data_root, tracking_uri, experiment, RunLogger(tracking_uri, parent_id), resumed, what
        )

    def trial_setup(self, config: Config) -> TrialSetup:
        return TrialSetup(
            config, self.data_root, self.tracking_uri, self.experiment, self.parent_run_id, self.directory
        )

    def run(self, trainable, new_tuner: Callable[[], Any]) -> tuple[Any, bool]:
        """Restore the Tune experiment from its folder, or build it with ``new_tuner()``; fit it.
        Returns Tune's ``ResultGrid`` and whether it was restored."""
        from ray import tune

        restored = tune.Tuner.can_restore(str(self.directory))
        if restored:
            print(f"[wsol] restoring the {self.what} in {self.directory}", flush=True)
            tuner = tune.Tuner.restore(
                str(self.directory), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = new_tuner()
        return fit_recorded(tuner, self.parent), restored

    def stop_if_interrupted(self, results, expected: int) -> None:
        """Tune returns normally on Ctrl-C with unfinished trials: then close the parent run as
        KILLED and raise ``KeyboardInterrupt`` with the way to resume."""
        if interrupted(results, expected):
            self.parent.finish("KILLED")
            raise KeyboardInterrupt(
                f"the {self.what} was interrupted; run the same command again to resume it from {self.directory}"
            )


def interrupted(results, expected: int) -> bool:
    """Fewer results than trials, or a trial that neither failed nor reported an epoch."""
    return len(results) < expected or any(r.error is None and not (r.metrics or {}).get(TIME_ATTR) for r in results)


def child_runs(
    tracking_uri: str, experiment: str, parent_run_id: str, *, finished_only: bool = False, max_results: int = 5000
) -> list:
    """The MLflow child runs of an experiment's parent run (``FINISHED`` ones only, if asked)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(
            f"MLflow experiment {experiment!r} is gone from {tracking_uri}: its child runs cannot be read"
        )
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (
        " and attributes.status = 'FINISHED'" if finished_only else ""
    )
    return list(client.search_runs([found.experiment_id], filter_string=where, max_results=max_results))


def fit_recorded(tuner, parent: RunLogger):
    """``tuner.fit()``; the MLflow parent run is closed as KILLED / FAILED if the fit is cut short.
    Meanwhile the placement groups that stopped trials' Train runs leave behind are freed and
    their Ray Train cleaners stopped (:mod:`wsol_core.experiments.placement_groups`: without it, a
    search on a cluster started without a dashboard waits forever on the first trial ASHA stops,
    and each stopped trial's cleaner polls for as long as the cluster runs)."""
    from wsol_core.experiments.placement_groups import reap_orphaned_placement_groups

    try:
        with reap_orphaned_placement_groups():
            return tuner.fit()
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except Exception:
        parent.finish("FAILED")
        raise


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial's Train workers take together (the trial's own function takes nothing)."""
    return {k: v * cfg.run.num_workers for k, v in resources_per_worker(cfg.run).items()}


def derive_max_concurrent(cfg: Config, cluster: dict[str, float], requested: int = 0) -> int:
    """How many trials fit side by side in ``cluster`` (at least 1), capped by ``requested``."""
    need = trial_resources(cfg)
    fits = min(int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0)
    fits = max(1, fits)
    return min(fits, requested) if requested else fits


def trial_trainable(function, setup: TrialSetup, **fixed: Any):
    """``function(config, setup=setup, **fixed)`` as a Tune trainable. The trial's own process
    only waits on its Train run, whose workers request their own CPUs/GPUs, so it reserves none."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(function, setup=setup, **fixed), {"CPU": 0, "memory": 64 * 1024**2})


def train_in_trial(
    cfg: Config, setup: TrialSetup, *, run_name: str, tags: dict[str, str], extra_params: dict[str, Any]
) -> None:
    """Train ``cfg`` inside the current Tune trial, as a nested MLflow run of ``setup``'s parent.

    The child run's key and the Train run's name are the trial id, so a restored trial resumes its
    MLflow run and its latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from wsol_core.tracking import start_or_resume_run
    from wsol_core.train.trainer import training_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    run_id, _ = start_or_resume_run(
        setup.tracking_uri,
        setup.experiment,
        f"{setup.directory}/{trial_id}",
        run_name=run_name,
        tags={"mlflow.parentRunId": setup.parent_run_id, "wsol.search.trial_id": trial_id, **tags},
    )
    logger = RunLogger(setup.tracking_uri, run_id)
    logger.log_params({**flatten(cfg), **extra_params, "data.resolved_root": str(setup.data_root)})
    context = RunContext(
        config=cfg, data_root=setup.data_root, tracking_uri=setup.tracking_uri, mlflow_run_id=run_id, progress="bar"
    )
    # Ray restarts a trial's workers itself (run.max_failures); one kept checkpoint, the best by
    # val score (Ray also keeps the latest), is what the sweeps' best-checkpoint scoring reads.
    placement = RunPlacement(
        name=trial_id,
        storage_path=setup.train_storage,
        keep_checkpoints=1,
        max_failures=cfg.run.max_failures,
        callbacks=(TuneReportCallback(),),
    )
    try:
        training_trainer(context, placement).fit()
    except Exception:
        logger.finish("FAILED")
        raise
    logger.finish("FINISHED")
