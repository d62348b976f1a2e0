"""Which checkpoint a re-run continues from, decided by the driver before any worker starts.

Ray Train hands the workers the latest checkpoint it registered for the run. If that file was
damaged (a node lost mid-write, a disk filled up), every worker would die loading it and Ray
would retry the same file until ``run.max_failures`` is spent. So the driver verifies the run's
checkpoints first (:func:`~wsol_core.checkpoint.verify_checkpoint`: manifest size and
SHA-256, a weights-only load, the config fingerprint and the MLflow run id), names each damaged
one, and tells the workers which checkpoint to load: the newest good one, or the one given with
``--resume-from``. When checkpoints exist and none is good, it stops with exit status 2 before
Ray starts, listing them and the ways out.

A checkpoint the workers' own fit reports later (after a worker failure inside this run) is newer
than everything the driver saw, and the workers take it as Ray hands it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsol_core.checkpoint import CheckpointInfo, DamagedCheckpointError, verify_checkpoint
from wsol_core.config import ConfigError, read_through_schema


@dataclass
class ResumePlan:
    checkpoint: CheckpointInfo | None  # what the workers load; None: start at epoch 1
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), newest first
    present: list[str] = field(default_factory=list)  # checkpoint directory names at the start

    def describe(self) -> list[str]:
        lines = [f"[wsol] checkpoint {path} is damaged: {reason} (skipped)" for path, reason in self.damaged]
        if self.checkpoint is not None:
            lines.append(f"[wsol] resuming from {self.checkpoint.path} (epoch {self.checkpoint.epoch})")
        return lines


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first (Ray names them by time of report)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def plan_resume(run_dir: Path, config: dict[str, Any], resume_from: str = "") -> ResumePlan:
    """Verify the run's checkpoints and pick the one to continue from.

    Raises:
        ConfigError: ``resume_from`` is damaged or not a checkpoint, or checkpoints exist and
            every one of them is damaged (the message lists them and how to go on).
    """
    candidates = run_checkpoints(run_dir)
    present = [p.name for p in candidates]
    if resume_from:
        chosen = Path(resume_from).expanduser().resolve()
        try:
            return ResumePlan(
                verify_checkpoint(chosen, config=config, read_config=read_through_schema), present=present
            )
        except (DamagedCheckpointError, FileNotFoundError) as err:
            raise ConfigError(f"run.resume_from: {err}") from None
    damaged: list[tuple[str, str]] = []
    for directory in candidates:
        try:
            return ResumePlan(
                verify_checkpoint(directory, config=config, read_config=read_through_schema), damaged, present
            )
        except (DamagedCheckpointError, FileNotFoundError) as err:
            damaged.append((str(directory), getattr(err, "reason", str(err))))
    if damaged:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in damaged)
        raise ConfigError(
            f"every checkpoint of the run in {run_dir} is damaged:\n{listing}\n"
            "Continue from a checkpoint you trust with --resume-from CHECKPOINT_DIR, or start a fresh run "
            "under a new name with --no-resume (the damaged run and its MLflow run are left as they are)."
        )
    return ResumePlan(None, [], present)


def check_run_identity(plan: ResumePlan, mlflow_run_id: str | None, logged_epochs: int, run_dir: Path) -> None:
    """The checkpoint must belong to the MLflow run being resumed, and an MLflow run that has
    logged epochs is never restarted from scratch."""
    if (
        plan.checkpoint is not None
        and mlflow_run_id
        and plan.checkpoint.mlflow_run_id
        and plan.checkpoint.mlflow_run_id != mlflow_run_id
    ):
        raise ConfigError(
            f"{plan.checkpoint.path} belongs to MLflow run {plan.checkpoint.mlflow_run_id}, but this name maps to MLflow run "
            f"{mlflow_run_id} (another tracking store?); pass --tracking-uri of the original run, or --no-resume"
        )
    if plan.checkpoint is None and mlflow_run_id and logged_epochs > 0:
        raise ConfigError(
            f"MLflow run {mlflow_run_id} already has {logged_epochs} epoch(s) logged, but no checkpoint is left in {run_dir}: "
            "it would restart from scratch into the same run. Pass --no-resume for a fresh run under a new name."
        )


def pick_checkpoint(handed: str | None, plan: dict[str, Any] | None) -> str | None:
    """In a worker: the directory to load. ``handed`` is the path of Ray's checkpoint (or None);
    one written during this fit (not among the checkpoints the driver saw) wins, otherwise the
    driver's choice stands (which may be no checkpoint at all)."""
    if plan is None:  # not started by the driver (e.g. a Tune trial): Ray's choice
        return handed
    if handed is not None and Path(handed).name not in set(plan["present"]):
        return handed
    return plan["checkpoint"]
