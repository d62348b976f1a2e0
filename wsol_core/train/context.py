"""What a training run hands Ray Train, as plain typed values (no Ray import here, so the driver
and the experiments build them before Ray starts; :mod:`wsol_core.train.trainer` turns them into
a ``TorchTrainer``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsol_core.config import Config
from wsol_core.config import RunConfig as RunSection
from wsol_core.train.resume import ResumePlan


@dataclass(frozen=True)
class RunContext:
    """What the workers of one training run need besides the code."""

    config: Config
    data_root: Path
    tracking_uri: str
    mlflow_run_id: str
    registered_model_name: str = ""  # "" registers nothing
    progress: str | bool = "lines"  # "bar" on a terminal, "lines" in logs
    # The driver's verified choice of checkpoint and the checkpoints it saw; ``None`` when the
    # driver made no plan (a Tune trial, or storage on an object store): Ray's choice stands.
    resume_checkpoint: str | None = None
    checkpoints_present: tuple[str, ...] | None = None

    def resumed_from(self, plan: ResumePlan | None) -> RunContext:
        """This context with the driver's resume ``plan`` (``None``: no plan)."""
        if plan is None:
            return dataclasses.replace(self, resume_checkpoint=None, checkpoints_present=None)
        checkpoint = str(plan.checkpoint.path) if plan.checkpoint else None
        return dataclasses.replace(self, resume_checkpoint=checkpoint, checkpoints_present=tuple(plan.present))

    @property
    def resume_plan(self) -> dict[str, Any] | None:
        """The plan in the form :func:`wsol_core.train.resume.pick_checkpoint` reads."""
        if self.checkpoints_present is None:
            return None
        return {"checkpoint": self.resume_checkpoint, "present": list(self.checkpoints_present)}


@dataclass(frozen=True)
class RunPlacement:
    """Where Ray Train keeps a run and how it treats checkpoints and failures."""

    name: str
    storage_path: str
    keep_checkpoints: int  # the best by the loop's SCORE_KEY; Ray also keeps the latest
    # Ray's own restarts. The job retries in its driver instead (0 here), because only the driver
    # can tell a fault of the data from a lost worker; a Tune trial leaves it to Ray.
    max_failures: int = 0
    callbacks: Sequence[Any] = field(default_factory=tuple)

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name


def resources_per_worker(run: RunSection) -> dict[str, float]:
    """What one Train worker of ``run`` takes: ``cpus_per_worker`` CPUs and, with ``use_gpu``, a GPU."""
    return {"CPU": run.cpus_per_worker, **({"GPU": 1.0} if run.use_gpu else {})}
