"""The one place that builds Ray Train's ``TorchTrainer``.

Every Ray Train fit of the project goes through here: the training job (:mod:`wsol_core.train.driver`,
which the SLURM launcher and ``ray job submit`` run), each Tune trial of a search or a seeded sweep
(:mod:`wsol_core.experiments.trials`), and the distributed inference of ``evaluate`` and
``localize``. So the scaling (workers, CPUs and a GPU per worker), where Ray keeps the run, its
checkpoint policy and its failure policy are decided in one file.

A training run crosses the Ray boundary as one typed
:class:`~wsol_core.train.context.RunContext` (the ``Config`` object itself, the data root, the
MLflow coordinates, the resume plan), pickled by Ray with the worker function; the workers read it
as it is instead of re-parsing a dict.

Import this module only after :func:`wsol_core.train.ray_session.init_ray`: importing Ray Train
first would fix how its workers start.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from wsol_core.config import RunConfig as RunSection  # the config's run section, not Ray's RunConfig
from wsol_core.train.context import RunContext, RunPlacement, resources_per_worker
from wsol_core.train.loop import SCORE_KEY, train_loop_per_worker


def scaling(run: RunSection) -> ScalingConfig:
    """The workers of ``run``: ``num_workers`` processes, ``cpus_per_worker`` CPUs and one GPU each."""
    return ScalingConfig(
        num_workers=run.num_workers,
        use_gpu=run.use_gpu,
        resources_per_worker=resources_per_worker(run),
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
