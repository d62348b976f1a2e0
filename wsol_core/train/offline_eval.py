"""Scoring a finished model: from a checkpoint (directory, ``state.pt``, Ray checkpoint or MLflow
model URI) on one shard split, in one process or across Ray Train workers.

Weights always come from the weights-only training state (``torch.load(weights_only=True)``):
for an MLflow model that is the ``state.pt`` the training job stores in the model's
``extra_files``, so no pickled object is ever loaded. A released checkpoint of the field
(clovaai/wsolevaluation's CAM models, CVI-SZU/CCAM's C2AM models; any other file name than
``state.pt``) is converted by :mod:`wsol_core.models.released`.

**The Loc threshold.** GT-known / Top-k Loc of a test split are read at the threshold chosen on
val. A model trained here stores it (``TrainingState.loc_threshold_index``, from the final val
evaluation); :func:`evaluate_checkpoint` uses it on ``test`` by default, or scores the ``val``
split beside ``test`` first when the checkpoint has none (a released model).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from wsol_core.checkpoint import STATE_FILE, load_training_state, verify_checkpoint
from wsol_core.config import Config, load_config
from wsol_core.data.loader import build_loader
from wsol_core.data.manifest import load_manifest
from wsol_core.methods import Inference, WSOLMethod, build_method
from wsol_core.train.evaluate import eval_autocast, evaluate_split


def _is_mlflow_uri(source: str) -> bool:
    return source.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


def local_state_file(source: str, tracking_uri: str = "") -> Path:
    """The ``state.pt`` behind ``source``, downloading MLflow artifacts when needed."""
    if _is_mlflow_uri(source):
        import mlflow.artifacts

        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
        directory = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="wsol-eval-"))
        )
        found = sorted(directory.rglob(STATE_FILE))
        if not found:
            raise FileNotFoundError(
                f"{source}: no {STATE_FILE} among the model's files (was it logged by this project?)"
            )
        return found[0]
    path = Path(source)
    if path.is_dir():
        if not (path / STATE_FILE).is_file():
            inside = sorted(p.name for p in path.glob("checkpoint_*") if p.is_dir())
            hint = f"; it holds Ray checkpoints, pass one of them: {inside[-3:]}" if inside else ""
            raise FileNotFoundError(f"checkpoint {source!r}: no {STATE_FILE} in this directory{hint}")
        return path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {source!r} does not exist")
    return path  # state.pt, or a released checkpoint (load_model tells them apart)


@dataclass
class LoadedModel:
    """A model ready to evaluate or localize with, and what it was stored with."""

    method: WSOLMethod
    cfg: Config
    loc_threshold: float | None  # the threshold chosen on val, when the checkpoint has one
    source: str  # "project", "wsolevaluation" or "ccam"
    note: str = ""


def load_model(
    source: str,
    *,
    tracking_uri: str = "",
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
    layout: str = "auto",
) -> LoadedModel:
    """This project's checkpoint (directory, ``state.pt``, MLflow URI) or a released one."""
    state_file = local_state_file(source, tracking_uri)
    if state_file.name != STATE_FILE:
        return _load_released(state_file, overrides or [], device, layout)
    state = load_training_state(state_file.parent, map_location="cpu")
    # The run's own config, with pretrained loading off: the checkpoint has every weight.
    cfg = load_config(base=state.config, overrides=["model.pretrained=null", *(overrides or [])])
    num_classes = cfg.model.num_classes or _num_classes_from_weights(state.model)
    method = build_method(cfg, num_classes)
    method.load_state_dict(state.model)
    return LoadedModel(_ready(method, cfg, device), cfg, state.loc_threshold, "project")


def _load_released(path: Path, overrides: list[str], device, layout: str) -> LoadedModel:
    from wsol_core.models.released import convert_released

    asked = [o for o in overrides if o.startswith("model.large_feature_map=")]
    large = asked[-1].split("=", 1)[1].strip().lower() in ("1", "true", "yes") if asked else None
    released = convert_released(path, layout, large_feature_map=large)
    cfg = load_config(overrides=[*released.overrides, "model.pretrained=null", *overrides])
    method = build_method(cfg, released.num_classes)
    method.load_state_dict(released.state_dict, strict=True)
    return LoadedModel(_ready(method, cfg, device), cfg, None, released.layout, released.note)


class PairedModel(torch.nn.Module):
    """A localizer's maps with a separate classifier's logits: how PSOL and C2AM + PSOL (seed 004,
    Sec. 3.4) read Top-1 / Top-5 Loc, a class-agnostic box counted only where the classifier is
    right. Evaluation reads it like a method; it trains nothing."""

    loss_masks = WSOLMethod.loss_masks  # none: nothing is trained
    inference_variants = WSOLMethod.inference_variants

    def __init__(self, localizer: WSOLMethod, classifier: WSOLMethod) -> None:
        super().__init__()
        self.localizer, self.classifier = localizer, classifier
        self.uses_labels = localizer.uses_labels  # the GT class's CAM where the localizer has one

    @torch.no_grad()
    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        logits = self.classifier.inference(images, None).logits
        return Inference(logits=logits, maps=self.localizer.inference(images, labels).maps)


def pair_with_classifier(
    loaded: LoadedModel, classifier: str, *, num_classes: int, device, tracking_uri: str = "", layout: str = "auto"
) -> LoadedModel:
    """``loaded`` with ``classifier``'s logits (a checkpoint of any method that has a classifier)."""
    other = load_model(str(local_state_file(classifier, tracking_uri)), device=device, layout=layout)
    probe = torch.zeros(1, 3, 64, 64, device=device)
    logits = other.method.inference(probe, None).logits
    if logits is None:
        raise ValueError(
            f"--classifier {classifier}: a {other.cfg.method.name} model has no classifier (no logits); "
            "pass a checkpoint of a method that classifies (cam, fmcg, icl, or caml / c2am with their probe)"
        )
    if num_classes and logits.shape[1] != num_classes:
        raise ValueError(f"--classifier {classifier}: it scores {logits.shape[1]} classes, the split has {num_classes}")
    paired = PairedModel(loaded.method, other.method).eval()
    note = f"Top-k Loc with {other.cfg.method.name}/{other.cfg.model.backbone} from {classifier}"
    return replace(loaded, method=paired, note="; ".join(n for n in (loaded.note, note) if n))  # type: ignore[arg-type]


def _ready(method: WSOLMethod, cfg: Config, device) -> WSOLMethod:
    method = method.to(device).eval()
    if cfg.train.channels_last:  # as in training, so the numbers match the run's own evaluation
        method = method.to(memory_format=torch.channels_last)
    return method


def _num_classes_from_weights(weights: dict[str, torch.Tensor]) -> int:
    for key in ("head.fc.weight", "probe.weight", "probe.fc.weight"):
        if key in weights:
            return int(weights[key].shape[0])
    return 0


def threshold_index(value: float, interval: float) -> int:
    """The index of threshold ``value`` in ``np.arange(0, 1, interval)`` (the nearest one)."""
    import numpy as np

    grid = np.arange(0, 1, interval)
    return int(np.abs(grid - value).argmin())


@dataclass(frozen=True)
class InferenceWorker:
    """Where a Ray Train inference worker stands: its model on its device, its rank and world size."""

    loaded: LoadedModel
    device: torch.device
    rank: int
    world_size: int


def inference_worker(source: str, overrides: list[str], layout: str) -> InferenceWorker:
    """Inside a Ray Train worker (``evaluate``, ``localize``, ``extract_boxes``): load ``source``
    on this worker's device."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    loaded = load_model(source, overrides=overrides, device=device, layout=layout)
    return InferenceWorker(loaded, device, context.get_world_rank(), context.get_world_size())


def evaluate_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: score this rank's share and report the all-reduced metrics."""
    import ray.train

    from wsol_core.train.loop import eval_loader_options

    worker = inference_worker(config["source"], config["overrides"], config["layout"])
    loaded, device = worker.loaded, worker.device
    if config["classifier"]:
        loaded = pair_with_classifier(loaded, config["classifier"], num_classes=0, device=device)
    method, cfg = (
        loaded.method,
        replace(loaded.cfg, eval=replace(loaded.cfg.eval, cam_curve_interval=config["interval"])),
    )
    loader = build_loader(
        config["split_dir"],
        split_kind="eval",
        rank=worker.rank,
        world_size=worker.world_size,
        device=device,
        options=eval_loader_options(cfg),
        batch_size=cfg.eval.batch_size,
    )
    with eval_autocast(cfg.eval.precision, device):
        outcome = evaluate_split(
            method, loader, cfg.eval, split=config["split"], loc_threshold_index=config["loc_threshold_index"]
        )
    if worker.rank != 0:
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
    layout: str = "auto",
    loc_threshold: float | str = "auto",
    classifier: str = "",
) -> dict[str, float]:
    """Protocol metrics of a checkpoint on ``split_dir``; ``num_workers`` > 0 runs on Ray Train.

    ``loc_threshold``: ``auto`` reads Loc on ``test`` at the checkpoint's val threshold, else at
    the best threshold of a ``val`` split beside ``split_dir`` (scored first), else (no val
    split) at this split's own best, with a warning; ``self`` always takes the split's own best
    (how val chooses); a number in [0, 1) fixes it. The threshold used is in
    ``<split>/loc_threshold``.

    ``classifier``: a checkpoint whose logits replace the model's own (:class:`PairedModel`), for
    Top-1 / Top-5 Loc of a class-agnostic localizer such as the box regressor.
    """
    source = str(local_state_file(source, tracking_uri))  # download once; workers read the file
    # A damaged file is named here, not deep in a worker; a released checkpoint stores no threshold.
    stored = verify_checkpoint(Path(source).parent).loc_threshold if Path(source).name == STATE_FILE else None
    split_dir = Path(split_dir)
    manifest = load_manifest(split_dir)  # a clear error for a wrong directory before anything starts
    if classifier:  # downloaded once, checked here (it has logits, for this split's classes)
        classifier = str(local_state_file(classifier, tracking_uri))
        pair_with_classifier(
            load_model(source, overrides=overrides, layout=layout),
            classifier,
            num_classes=manifest.num_classes,
            device="cpu",
        )
    index: int | None = None
    if loc_threshold == "auto" and split != "val":
        if stored is not None:
            index = threshold_index(stored, interval)
        elif (split_dir.parent / "val" / "dataset.json").is_file():
            print(
                f"[wsol] no val threshold stored with the model: scoring {split_dir.parent / 'val'} to choose it",
                flush=True,
            )
            chosen = _evaluate(
                source,
                split_dir.parent / "val",
                "val",
                interval,
                overrides,
                num_workers,
                use_gpu,
                layout,
                None,
                classifier,
            )
            if "val/loc_threshold" in chosen:
                index = threshold_index(chosen["val/loc_threshold"], interval)
        else:
            print(
                f"[wsol] warning: no val threshold stored and no val split beside {split_dir}: Loc is read at {split}'s own best threshold",
                flush=True,
            )
    elif loc_threshold not in ("auto", "self"):
        value = float(loc_threshold)
        if not 0 <= value < 1:
            raise ValueError(f"loc_threshold {value} must be in [0, 1)")
        index = threshold_index(value, interval)
    return _evaluate(source, split_dir, split, interval, overrides, num_workers, use_gpu, layout, index, classifier)


def _evaluate(
    source, split_dir, split, interval, overrides, num_workers, use_gpu, layout, index, classifier=""
) -> dict[str, float]:
    if num_workers <= 0:
        from wsol_core.train.loop import eval_loader_options

        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        loaded = load_model(source, overrides=overrides, device=device, layout=layout)
        if classifier:
            loaded = pair_with_classifier(loaded, classifier, num_classes=0, device=device)
        cfg = replace(loaded.cfg, eval=replace(loaded.cfg.eval, cam_curve_interval=interval))
        loader = build_loader(
            split_dir,
            split_kind="eval",
            device=device,
            options=eval_loader_options(cfg),
            batch_size=cfg.eval.batch_size,
        )
        with eval_autocast(cfg.eval.precision, device):
            return evaluate_split(loaded.method, loader, cfg.eval, split=split, loc_threshold_index=index).metrics

    from wsol_core.train.ray_session import init_ray

    init_ray()
    from wsol_core.train.trainer import inference_trainer

    trainer = inference_trainer(
        evaluate_worker,
        {
            "source": source,
            "split_dir": str(split_dir),
            "split": split,
            "interval": interval,
            "overrides": overrides or [],
            "layout": layout,
            "loc_threshold_index": index,
            "classifier": classifier,
        },
        num_workers=num_workers,
        use_gpu=use_gpu,
        purpose="eval",
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the evaluation workers on {split_dir} reported no metrics")
    with result.checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / "metrics.json").read_text())
