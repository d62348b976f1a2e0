"""The one place that builds Ray Train's ``TorchTrainer``.

Every Ray Train fit of the project goes through here: the training job (:mod:`wsol_core.train.driver`,
which the SLURM launcher and ``ray job submit`` run), each Tune trial of a search or a seeded sweep
(:mod:`wsol_core.experiments.trials`), and the distributed inference of ``evaluate`` and
``localize``. So the scaling (workers, CPUs and a GPU per worker), where Ray keeps the run, its
checkpoint policy and its failure policy are decided in one file.

A training run crosses the Ray boundary as one typed :class:`RunContext` (the ``Config`` object
itself, the data root, the MLflow coordinates, the resume plan), pickled by Ray with the worker
function; the workers read it as it is instead of re-parsing a dict.

Import this module only after :func:`wsol_core.train.ray_session.init_ray`: importing Ray Train
first would fix how its workers start.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from wsol_core.config import Config
from wsol_core.config import RunConfig as RunSection  # the config's run section, not Ray's RunConfig
from wsol_core.train.loop import SCORE_KEY, train_loop_per_worker
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
    # The driver's verified choice of checkpoint (``None`` inside a Tune trial: Ray's choice).
    resume_checkpoint: str | None = None
    checkpoints_present: tuple[str, ...] = ()
    resume_planned: bool = False

    @classmethod
    def with_resume(cls, plan: ResumePlan | None, **fields: Any) -> RunContext:
        if plan is None:
            return cls(**fields)
        checkpoint = str(plan.checkpoint.path) if plan.checkpoint else None
        return cls(**fields, resume_checkpoint=checkpoint, checkpoints_present=tuple(plan.present), resume_planned=True)

    @property
    def resume_plan(self) -> dict[str, Any] | None:
        """The plan in the form :func:`wsol_core.train.resume.pick_checkpoint` reads."""
        if not self.resume_planned:
            return None
        return {"checkpoint": self.resume_checkpoint, "present": list(self.checkpoints_present)}


@dataclass(frozen=True)
class RunPlacement:
    """Where Ray Train keeps a run and how it treats checkpoints and failures."""

    name: str
    storage_path: str
    keep_checkpoints: int  # the best by SCORE_KEY; Ray also keeps the latest
    # Ray's own restarts. The job retries in its driver instead (0 here), because only the driver
    # can tell a fault of the data from a lost worker; a Tune trial leaves it to Ray.
    max_failures: int = 0
    callbacks: Sequence[Any] = field(default_factory=tuple)


def scaling(run: RunSection) -> ScalingConfig:
    """The workers of ``run``: ``num_workers`` processes, ``cpus_per_worker`` CPUs and one GPU each."""
    return ScalingConfig(
        num_workers=run.num_workers,
        use_gpu=run.use_gpu,
        resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
    )


def training_trainer(context: RunContext, placement: RunPlacement) -> TorchTrainer:
    """The trainer of one training run: the loop of :mod:`wsol_core.train.loop` on ``context``."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"context": context},
        scaling_config=scaling(context.config.run),
        run_config=RunConfig(
            name=placement.name,
            storage_path=placement.storage_path,
            failure_config=FailureConfig(max_failures=placement.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=placement.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",
            ),
            callbacks=list(placement.callbacks) or None,
        ),
    )


def inference_trainer(
    worker: Callable[[dict[str, Any]], None], payload: dict[str, Any], *, num_workers: int, use_gpu: bool, purpose: str
) -> TorchTrainer:
    """A short inference fit (``evaluate``, ``localize``): ``worker(payload)`` on each of
    ``num_workers`` processes, its Ray run kept in a fresh temporary folder named for ``purpose``."""
    return TorchTrainer(
        worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix=f"wsol-{purpose}-ray-")),
    )
