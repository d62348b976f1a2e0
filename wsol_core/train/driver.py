"""The driver side of a training run: checks, MLflow run, the fit on Ray Train, summary.

Run by ``jobs/train_imagenet.py`` (directly, through ``ray job submit`` or in a SLURM allocation
started by ``cluster/launch_slurm.py``). Everything that can be wrong with the configuration or
the data is checked before Ray is started or any resource is taken (:mod:`wsol_core.train.preflight`);
the trainer itself is built by :mod:`wsol_core.train.trainer`, which Tune trials share.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from wsol_core.checkpoint import DamagedCheckpointError
from wsol_core.config import Config, ConfigError, dump_yaml, flatten, to_dict
from wsol_core.data.format import ShardError
from wsol_core.data.resolve import resolve_data_root
from wsol_core.tracking import RunLogger, find_run, git_commit, resolve_tracking_uri, start_or_resume_run
from wsol_core.train.context import RunContext, RunPlacement
from wsol_core.train.preflight import check_data, check_pretrained, default_storage_path
from wsol_core.train.ray_session import init_ray
from wsol_core.train.resume import check_run_identity, plan_resume, run_checkpoints


@dataclass
class TrainingOutcome:
    run_name: str
    storage_path: str
    mlflow_run_id: str
    tracking_uri: str
    experiment: str
    resumed: bool
    metrics: dict[str, float]
    checkpoint_path: str | None

    def dashboard_command(self, port: int = 5000) -> str:
        # One worker process: MLflow's default of 4 kept dying on a 2-core machine and never served.
        return f"uv run mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port {port} --workers 1"

    def dashboard_url(self, experiment_id: str) -> str:
        return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{self.mlflow_run_id}"


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (what SLURM and ``kill`` send) stopped the driver."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


def _raise_on_sigterm(signum, frame) -> None:
    raise RunInterrupted("SIGTERM", 128 + signal.SIGTERM)


@contextmanager
def honest_run_status(logger: RunLogger, run_id: str, resume_hint: str):
    """Close the MLflow run however the driver ends: FINISHED (the caller), KILLED on SIGINT or
    SIGTERM, FAILED on any error (Ray's start included), and say how to resume. SIGTERM is
    turned into :class:`RunInterrupted` while the run is open, so that it unwinds like Ctrl-C."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    try:
        yield
    except KeyboardInterrupt as exc:
        logger.finish("KILLED")
        name = getattr(exc, "signal_name", "SIGINT")
        print(
            f"[wsol] stopped by {name}: MLflow run {run_id} is marked KILLED; {resume_hint}",
            file=sys.stderr,
            flush=True,
        )
        raise
    except BaseException as exc:
        logger.finish("FAILED")
        exc.add_note(f"[wsol] MLflow run {run_id} is marked FAILED; {resume_hint}")
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _fit(context: RunContext, placement: RunPlacement, ray_address: str | None):
    """Start (or join) Ray and run the training's ``TorchTrainer`` (:mod:`wsol_core.train.trainer`)."""
    init_ray(ray_address)  # before any other ray import: it decides how workers start
    if threading.current_thread() is threading.main_thread():
        # Ray's core installs a SIGTERM handler in the driver that aborts the process (exit -6);
        # take SIGTERM back so that it closes the run like Ctrl-C (honest_run_status).
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
    from wsol_core.train.trainer import training_trainer

    return _fit_in_a_thread(training_trainer(context, placement))


#: Faults of the data, the configuration or a checkpoint: the same on every attempt.
NOT_TRANSIENT = (ShardError, ConfigError, DamagedCheckpointError)


def not_transient(error: BaseException) -> BaseException | None:
    """The worker exception behind a failed fit that no retry can fix, if there is one. Ray
    Train returns each worker's exception wrapped with its traceback (``UserExceptionWithTraceback``,
    the original in ``_base_exc``); the traceback text is the fallback."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)
        if isinstance(base, NOT_TRANSIENT):
            return base
        text = str(failure)
        for kind in NOT_TRANSIENT:
            if f"{kind.__module__}.{kind.__name__}: " in text or f"\n{kind.__name__}: " in text:
                return RuntimeError(text.strip().splitlines()[-1])
    return None


def _fit_with_retries(context: RunContext, placement: RunPlacement, ray_address: str | None):
    """The fit, restarted from the newest checkpoint after a worker failure (a killed process, a
    lost node) up to ``run.max_failures`` times (-1: always); never after a fault of the data, the
    configuration or a checkpoint, which would only happen again (``NOT_TRANSIENT``)."""
    cfg = context.config
    failures = 0
    while True:
        try:
            return _fit(context, placement, ray_address)
        except Exception as err:
            from ray.train import TrainingFailedError  # imported only after init_ray (see _fit)

            if not isinstance(err, TrainingFailedError):
                raise
            cause = not_transient(err)
            if cause is not None:
                err.add_note(
                    f"[wsol] not retried: {type(cause).__name__} is a fault of the data or the configuration "
                    f"({str(cause).splitlines()[0][:300]}); fix it and run again"
                )
                raise
            failures += 1
            if cfg.run.max_failures != -1 and failures > cfg.run.max_failures:
                raise
            print(
                f"[wsol] the workers failed ({str(err).strip().splitlines()[0][:200]}); restarting from the newest checkpoint "
                f"(retry {failures} of {'unlimited' if cfg.run.max_failures == -1 else cfg.run.max_failures})",
                flush=True,
            )
            if "://" not in placement.storage_path:
                context = context.resumed_from(plan_resume(placement.run_dir, to_dict(cfg), ""))


def _fit_in_a_thread(trainer):
    """``trainer.fit()`` with the driver's main thread left to handle signals. Ray Train installs
    its own SIGINT handler when ``fit`` runs in the main thread, and it ends the call with an
    error that cannot be told from a crash; run elsewhere (as Tune runs it), Ctrl-C and SIGTERM
    reach :func:`honest_run_status` as :class:`KeyboardInterrupt`, and the run is closed as
    KILLED. The Ray Train controller and its workers belong to this driver and end with it."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: a signal is handled between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def resume_hint(cfg: Config, name: str, storage_path: str) -> str:
    """The one line that says how to continue this run."""
    if cfg.run.name == name and cfg.run.resume != "never":
        return "run the same command again to resume it from its newest checkpoint"
    return (
        f"to resume it from its newest checkpoint, run the same command with --name {name}"
        + (" (without --no-resume)" if cfg.run.resume == "never" else "")
        + ("" if storage_path == default_storage_path() else f" --storage-path {storage_path}")
    )


def run_training(cfg: Config, *, ray_address: str | None = None, registered_model_name: str = "") -> TrainingOutcome:
    """Train ``cfg`` on Ray Train and record it in MLflow; resumes a run with the same name."""
    data_root = resolve_data_root(cfg.data)
    data = check_data(data_root, cfg)
    if cfg.model.num_classes and cfg.model.num_classes != data["num_classes"]:
        raise ConfigError(
            f"model.num_classes = {cfg.model.num_classes} but the dataset has {data['num_classes']} classes"
        )

    name = cfg.run.name or f"{cfg.method.name}-{cfg.model.backbone}-{data['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = cfg.run.storage_path or default_storage_path()
    if "://" not in storage_path:  # local or shared file system; s3:// and gs:// stay as given
        storage_path = str(Path(storage_path).expanduser().resolve())
    check_pretrained(cfg)
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    experiment = cfg.run.experiment or data["dataset"]
    local_storage = "://" not in storage_path
    if cfg.run.resume == "never" and (
        find_run(tracking_uri, experiment, f"{storage_path}/{name}")
        or (local_storage and run_checkpoints(Path(storage_path) / name))
    ):
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[wsol] --no-resume: a fresh run under the new name {name!r}", flush=True)
    run_key = f"{storage_path}/{name}"
    # Which checkpoint to continue from, verified before anything starts (local / shared file
    # systems; on object stores Ray's own choice stands).
    resume = None
    if local_storage and cfg.run.resume == "auto":
        resume = plan_resume(Path(storage_path) / name, to_dict(cfg), cfg.run.resume_from)
        existing = find_run(tracking_uri, experiment, run_key)
        logged = (
            len(MlflowClient(tracking_uri).get_metric_history(existing.info.run_id, "train/loss")) if existing else 0
        )
        check_run_identity(resume, existing.info.run_id if existing else None, logged, Path(storage_path) / name)
        for line in resume.describe():
            print(line, flush=True)
    run_id, resumed = start_or_resume_run(
        tracking_uri,
        experiment,
        run_key,
        run_name=name,
        tags={
            "mlflow.source.git.commit": git_commit(),
            "wsol.method": cfg.method.name,
            "wsol.backbone": cfg.model.backbone,
            **data["tags"],
        },
    )
    logger = RunLogger(tracking_uri, run_id)
    logger.log_params(
        {
            **flatten(cfg),
            "data.resolved_root": str(data_root),
            **{f"data.num_{k}": v for k, v in data["counts"].items()},
        }
    )
    logger.log_text(dump_yaml(cfg), "config.yaml")
    print(f"[wsol] run {name!r}: MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {tracking_uri}", flush=True)
    context = RunContext(
        config=cfg,
        data_root=data_root,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        registered_model_name=registered_model_name,
        # A live bar on a terminal; plain periodic lines in logs (ray job logs, SLURM files, CI).
        progress=os.environ.get("WSOL_PROGRESS") or ("bar" if sys.stdout.isatty() else "lines"),
    ).resumed_from(resume)
    # Retries are the driver's (_fit_with_retries): Ray's would repeat deterministic errors.
    placement = RunPlacement(name=name, storage_path=storage_path, keep_checkpoints=cfg.train.keep_best, max_failures=0)
    with honest_run_status(logger, run_id, resume_hint(cfg, name, storage_path)):
        result = _fit_with_retries(context, placement, ray_address)
    logger.finish("FINISHED")
    # Ray keeps the metrics of the last checkpoint; the run's final (test) figures are in MLflow.
    final_metrics = {**(result.metrics or {}), **logger.client.get_run(run_id).data.metrics}
    return TrainingOutcome(
        run_name=name,
        storage_path=storage_path,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
        experiment=experiment,
        resumed=resumed,
        metrics=final_metrics,
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
    )
