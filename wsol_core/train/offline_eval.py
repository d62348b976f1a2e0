"""Scoring a finished model: from a checkpoint (directory, ``state.pt``, Ray checkpoint or MLflow
model URI) on one shard split, in one process or across Ray Train workers.

Weights always come from the weights-only training state (``torch.load(weights_only=True)``):
for an MLflow model that is the ``state.pt`` the training job stores in the model's
``extra_files``, so no pickled object is ever loaded.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from wsol_core.config import Config, load_config
from wsol_core.data.loader import build_loader
from wsol_core.data.manifest import load_manifest
from wsol_core.methods import WSOLMethod, build_method
from wsol_core.train.checkpoint import STATE_FILE, load_model_weights
from wsol_core.train.evaluate import evaluate_split


def _is_mlflow_uri(source: str) -> bool:
    return source.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


def local_state_file(source: str, tracking_uri: str = "") -> Path:
    """The ``state.pt`` behind ``source``, downloading MLflow artifacts when needed."""
    if _is_mlflow_uri(source):
        import mlflow.artifacts

        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        directory = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="wsol-eval-")))
        found = sorted(directory.rglob(STATE_FILE))
        if not found:
            raise FileNotFoundError(f"{source}: no {STATE_FILE} among the model's files (was it logged by this project?)")
        return found[0]
    path = Path(source)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            inside = sorted(p.name for p in path.glob("checkpoint_*") if p.is_dir())
            hint = f"; it holds Ray checkpoints, pass one of them: {inside[-3:]}" if inside else ""
            raise FileNotFoundError(f"checkpoint {source!r}: no {STATE_FILE} in this directory{hint}")
        return path / STATE_FILE
    if path.name != STATE_FILE or not path.is_file():
        raise FileNotFoundError(f"checkpoint {source!r} is neither a checkpoint directory nor a {STATE_FILE} file")
    return path


def load_method(state_file: Path, overrides: list[str] | None = None, device: str | torch.device = "cpu") -> tuple[WSOLMethod, Config]:
    weights, config_dict = load_model_weights(state_file, map_location="cpu")
    # The run's own config, with pretrained loading off: the checkpoint has every weight.
    cfg = load_config(base=config_dict, overrides=["model.pretrained=null", *(overrides or [])])
    num_classes = cfg.model.num_classes or _num_classes_from_weights(weights)
    method = build_method(cfg, num_classes)
    method.load_state_dict(weights)
    method = method.to(device).eval()
    if cfg.train.channels_last:  # as in training, so the numbers match the run's own evaluation
        method = method.to(memory_format=torch.channels_last)
    return method, cfg


def _num_classes_from_weights(weights: dict[str, torch.Tensor]) -> int:
    for key in ("head.fc.weight", "probe.weight", "probe.fc.weight"):
        if key in weights:
            return int(weights[key].shape[0])
    return 0


def evaluate_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: score this rank's share and report the all-reduced metrics."""
    import ray.train
    import ray.train.torch

    from wsol_core.train.loop import loader_options

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    method, cfg = load_method(Path(config["state_file"]), config["overrides"], device)
    cfg = replace(cfg, eval=replace(cfg.eval, cam_curve_interval=config["interval"]))
    loader = build_loader(
        config["split_dir"], split_kind="eval", rank=context.get_world_rank(), world_size=context.get_world_size(),
        device=device, options=loader_options(cfg), batch_size=cfg.eval.batch_size,
    )
    outcome = evaluate_split(method, loader, cfg.eval, split=config["split"])
    if context.get_world_rank() != 0:
        ray.train.report(outcome.metrics)
        return
    # The metrics travel back in a checkpoint: Ray keeps a result's metrics with its checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "metrics.json").write_text(json.dumps(outcome.metrics))
        ray.train.report(outcome.metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def evaluate_checkpoint(
    source: str,
    split_dir: str | Path,
    *,
    split: str = "test",
    interval: float = 0.001,
    overrides: list[str] | None = None,
    num_workers: int = 0,
    use_gpu: bool = False,
    tracking_uri: str = "",
) -> dict[str, float]:
    """Protocol metrics of a checkpoint on ``split_dir``; ``num_workers`` > 0 runs on Ray Train."""
    state_file = local_state_file(source, tracking_uri)
    load_manifest(split_dir)  # a clear error for a wrong directory before anything starts
    if num_workers <= 0:
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        method, cfg = load_method(state_file, overrides, device)
        cfg = replace(cfg, eval=replace(cfg.eval, cam_curve_interval=interval))
        from wsol_core.train.loop import loader_options

        loader = build_loader(split_dir, split_kind="eval", device=device, options=loader_options(cfg), batch_size=cfg.eval.batch_size)
        return evaluate_split(method, loader, cfg.eval, split=split).metrics

    from wsol_core.train.ray_session import init_ray

    init_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        evaluate_worker,
        train_loop_config={"state_file": str(state_file), "split_dir": str(split_dir), "split": split, "interval": interval, "overrides": overrides or []},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="wsol-eval-ray-")),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / "metrics.json").read_text())
