"""The driver side of a training run: checks, MLflow run, Ray Train ``TorchTrainer``, summary.

Shared by ``jobs/train_imagenet.py``, Tune trials that need several workers, and the SLURM
launcher, so none of them repeats this logic. Everything that can be wrong with the
configuration or the data is checked here before Ray is started or any resource is taken.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from wsol_core.config import Config, ConfigError, dump_yaml, flatten, to_dict
from wsol_core.data.manifest import load_manifest
from wsol_core.data.resolve import resolve_data_root
from wsol_core.tracking import RunLogger, find_run, git_commit, resolve_tracking_uri, start_or_resume_run
from wsol_core.train.loop import SCORE_KEY, train_loop_per_worker
from wsol_core.train.ray_session import init_ray
from wsol_core.train.resume import check_run_identity, plan_resume, run_checkpoints

SPLITS = ("train", "val", "test")


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

    def dashboard_command(self) -> str:
        return f"uv run mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1 --port 5000"

    def dashboard_url(self, experiment_id: str) -> str:
        return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{self.mlflow_run_id}"


def default_storage_path() -> str:
    return str(Path(os.environ.get("WSOL_STORAGE_PATH", Path.home() / "wsol_runs")).resolve())


def check_data(root: Path) -> dict[str, Any]:
    """Every split's manifest is readable and consistent; returns what MLflow records of it."""
    manifests = {}
    for split in SPLITS:
        split_dir = root / split
        if not (split_dir / "dataset.json").is_file():
            raise ConfigError(f"data.root = {str(root)!r}: no {split}/dataset.json (write shards with jobs/make_shards.py)")
        manifests[split] = load_manifest(split_dir)
    train = manifests["train"]
    for split in ("val", "test"):
        if manifests[split].num_classes != train.num_classes:
            raise ConfigError(
                f"data.root = {str(root)!r}: {split} has {manifests[split].num_classes} classes, train has {train.num_classes}"
            )
    return {
        "dataset": train.dataset,
        "num_classes": train.num_classes,
        "tags": {f"data.{split}.sha256": ",".join(s.sha256[:16] for s in m.shards)[:4000] for split, m in manifests.items()},
        "counts": {split: m.num_samples for split, m in manifests.items()},
    }


def check_pretrained(cfg: Config) -> None:
    """``model.pretrained`` names a readable file before Ray starts: a damaged or foreign
    training checkpoint or weights file gets a one-line error naming it."""
    source = cfg.model.pretrained
    if not source or source == "torchvision":
        return
    from wsol_core.train.checkpoint import STATE_FILE, DamagedCheckpointError, verify_checkpoint

    path = Path(source).expanduser()
    try:
        if path.is_dir() or path.name == STATE_FILE:
            verify_checkpoint(path if path.is_dir() else path.parent)
        elif not path.is_file():
            raise ConfigError(f"model.pretrained = {source!r}: no such file or checkpoint directory")
        else:
            import torch

            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"model.pretrained = {source!r}: does not load with torch.load(weights_only=True): {reason}") from None
    except DamagedCheckpointError as err:
        raise ConfigError(f"model.pretrained: {err}") from None


def run_training(cfg: Config, *, ray_address: str | None = None, registered_model_name: str = "") -> TrainingOutcome:
    """Train ``cfg`` on Ray Train and record it in MLflow; resumes a run with the same name."""
    data_root = resolve_data_root(cfg.data)
    data = check_data(data_root)
    if cfg.model.num_classes and cfg.model.num_classes != data["num_classes"]:
        raise ConfigError(f"model.num_classes = {cfg.model.num_classes} but the dataset has {data['num_classes']} classes")

    name = cfg.run.name or f"{cfg.method.name}-{cfg.model.backbone}-{data['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = cfg.run.storage_path or default_storage_path()
    if "://" not in storage_path:  # local or shared file system; s3:// and gs:// stay as given
        storage_path = str(Path(storage_path).expanduser().resolve())
    check_pretrained(cfg)
    tracking_uri = resolve_tracking_uri(cfg.run.tracking_uri)
    experiment = cfg.run.experiment or data["dataset"]
    local_storage = "://" not in storage_path
    if cfg.run.resume == "never" and (find_run(tracking_uri, experiment, f"{storage_path}/{name}") or (local_storage and run_checkpoints(Path(storage_path) / name))):
        name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"[wsol] --no-resume: a fresh run under the new name {name!r}", flush=True)
    run_key = f"{storage_path}/{name}"
    # Which checkpoint to continue from, verified before anything starts (local / shared file
    # systems; on object stores Ray's own choice stands).
    resume = None
    if local_storage and cfg.run.resume == "auto":
        resume = plan_resume(Path(storage_path) / name, to_dict(cfg), cfg.run.resume_from)
        existing = find_run(tracking_uri, experiment, run_key)
        logged = len(MlflowClient(tracking_uri).get_metric_history(existing.info.run_id, "train/loss")) if existing else 0
        check_run_identity(resume, existing.info.run_id if existing else None, logged, Path(storage_path) / name)
        for line in resume.describe():
            print(line, flush=True)
    run_id, resumed = start_or_resume_run(
        tracking_uri,
        experiment,
        run_key,
        run_name=name,
        tags={"mlflow.source.git.commit": git_commit(), "wsol.method": cfg.method.name, "wsol.backbone": cfg.model.backbone, **data["tags"]},
    )
    logger = RunLogger(tracking_uri, run_id)
    logger.log_params({**flatten(cfg), "data.resolved_root": str(data_root), **{f"data.num_{k}": v for k, v in data["counts"].items()}})
    logger.log_text(dump_yaml(cfg), "config.yaml")
    print(f"[wsol] run {name!r}: MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {tracking_uri}", flush=True)

    init_ray(ray_address)  # before any other ray import: it decides how workers start
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer


    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "data_root": str(data_root),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": run_id,
            "registered_model_name": registered_model_name,
            "resume": None if resume is None else {
                "checkpoint": str(resume.checkpoint.path) if resume.checkpoint else None, "present": resume.present,
            },
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_best, checkpoint_score_attribute=SCORE_KEY, checkpoint_score_order="max"
            ),
        ),
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        logger.finish("KILLED")  # the same command resumes it
        raise
    except Exception:
        logger.finish("FAILED")
        raise
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
