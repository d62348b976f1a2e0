"""MLflow glue: one run per training run, created by the driver, written by rank 0 only.

Everything goes through an ``MlflowClient`` bound to an explicit run id, never through MLflow's
process-global "active run", so several runs (Tune trials) can share a process safely.

A run is identified by a *run key* (the Ray storage path and run name). The driver looks the
key up before creating a run, so re-running the same command resumes the same MLflow run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

RUN_KEY_TAG = "wsol.run_key"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def resolve_tracking_uri(uri: str = "") -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file in the working directory.

    The SQLite path is made absolute so that Ray workers, whose working directory differs from
    the driver's, write into the same database.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def git_commit(path: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_READY_STORES: set[str] = set()


def ensure_store(tracking_uri: str) -> None:
    """Create (migrate) a SQLite store under a file lock, once per process.

    MLflow creates a new SQLite database's schema on first use with Alembic migrations, which
    are not safe to run from two processes at once: two jobs started together on a fresh
    ``mlflow.db`` (a sweep's trials, two shells) make one of them fail with "Online migration
    expected to match one row". The lock makes the second wait for the first to finish.
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return
    import fcntl

    db = Path(tracking_uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    _READY_STORES.add(tracking_uri)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id; a concurrent creator of the same name is not an error."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_run(tracking_uri: str, experiment: str, run_key: str):
    """The newest MLflow run tagged with ``run_key`` in ``experiment``, or None (creates nothing
    but the store and the experiment)."""
    ensure_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment)
    escaped = run_key.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{escaped}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def start_or_resume_run(
    tracking_uri: str, experiment: str, run_key: str, run_name: str, tags: Mapping[str, str] | None = None
) -> tuple[str, bool]:
    """The id of the run with ``run_key`` in ``experiment`` (marked running again), or of a new one."""
    found = find_run(tracking_uri, experiment, run_key)  # first: it prepares the store under its lock
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    return run.info.run_id, False


class RunLogger:
    """Logs into one MLflow run by id; every call is a no-op when ``enabled`` is False (rank != 0)."""

    def __init__(self, tracking_uri: str, run_id: str, enabled: bool = True) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.enabled = enabled and bool(run_id)
        self._client = MlflowClient(tracking_uri) if self.enabled else None
        self._system_monitor: Any = None  # mlflow's SystemMetricsMonitor while it runs

    @property
    def client(self) -> MlflowClient:
        """The run's MLflow client; only an enabled logger (rank 0) has one."""
        if self._client is None:
            raise RuntimeError(
                f"RunLogger for run {self.run_id!r} is disabled (not rank 0, or no run): it has no MLflow client"
            )
        return self._client

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        existing = self.client.get_run(self.run_id).data.params
        fresh, changed = [], []
        for key, value in params.items():
            text = str(value)[:_MAX_PARAM_LENGTH]
            if key not in existing:
                fresh.append(Param(key, text))
            elif existing[key] != text:
                changed.append(f"{key}: {existing[key]} -> {text}")
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start : start + 100])
        if changed:
            # MLflow params are immutable; a resumed run with a changed config records the change.
            log.warning("resumed run %s with changed params: %s", self.run_id, "; ".join(changed))
            self.client.set_tag(self.run_id, "wsol.changed_params_on_resume", "; ".join(changed)[:5000])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 500])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value)[:5000])

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_model(self, model, state_file: str | Path, registered_name: str = "") -> None:
        """The final model as an ``mlflow.pytorch`` model, with the weights-only training state
        beside it (``extra_files``) so evaluation never has to unpickle the model object."""
        if not self.enabled:
            return
        import mlflow
        import mlflow.pytorch

        # mlflow.pytorch logs into the active run; scope it to this call only.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                mlflow.pytorch.log_model(
                    model,
                    name="model",
                    # The module object with the project's code beside it; the weights-only
                    # state in extra_files is what jobs/evaluate.py reads.
                    serialization_format="pickle",
                    code_paths=[str(Path(__file__).resolve().parent)],
                    extra_files=[str(state_file)],
                    registered_model_name=registered_name or None,
                    pip_requirements=["torch", "torchvision"],
                )
        finally:
            mlflow.set_tracking_uri(previous)

    def start_system_metrics(self) -> None:
        if not self.enabled or self._system_monitor is not None:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=True, tracking_uri=self.tracking_uri
            )
            self._system_monitor.start()
        except Exception as err:  # psutil missing, or an unsupported platform: keep training
            log.warning("MLflow system metrics unavailable: %s", err)
            self._system_monitor = None

    def stop_system_metrics(self) -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        self.stop_system_metrics()
        if self.enabled:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except MlflowException as err:
                log.warning("could not close MLflow run %s: %s", self.run_id, err)
