"""The training loop that runs in every Ray Train worker.

It reads top to bottom: build the method, optimizer and loaders; restore the latest checkpoint if
Ray hands one over; then per epoch train, evaluate on val every ``train.eval_every`` epochs, and
report metrics plus a checkpoint to Ray. The test split is scored once at the end.

Rank 0 alone writes to MLflow (the driver created the run and passed its id) and saves
checkpoints; every rank takes part in the all-reduces of evaluation.
"""

from __future__ import annotations

import math
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist

from wsol_core.checkpoint import (
    TrainingState,
    capture_rng_states,
    load_training_state,
    restore_rng_states,
    save_training_state,
)
from wsol_core.config import Config, flatten, to_dict
from wsol_core.data.batch import Batch
from wsol_core.data.loader import LoaderOptions, build_loader
from wsol_core.data.manifest import load_manifest
from wsol_core.methods import WSOLMethod, build_method
from wsol_core.reporting import log_run_summary
from wsol_core.train.evaluate import EvalOutcome, eval_autocast, evaluate_split
from wsol_core.train.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:  # MLflow is needed by the worker entry point only: an epoch runs without it
    from wsol_core.tracking import RunLogger

SCORE_KEY = "val/score"  # checkpoints are ranked by this (Ray CheckpointConfig); see val_score()


def val_score(val_metrics: dict[str, float]) -> float:
    """The model-selection score: val MaxBoxAccV2 on a split with boxes, val PxAP on a split with
    masks only (OpenImages); -1 before the first evaluation."""
    for key in ("val/maxboxacc_v2", "val/pxap"):
        if key in val_metrics:
            return val_metrics[key]
    return -1.0


def eval_loader_options(cfg: Config) -> LoaderOptions:
    """The evaluation splits' input options: ``eval.loader: exact`` reads them with the torch
    path, bit-identical to the protocol's transform; ``same`` keeps ``data.loader``."""
    options = loader_options(cfg)
    return replace(options, backend="torch", decode="workers") if cfg.eval.loader == "exact" else options


#: LoaderOptions fields that do not come from ``data.<same name>``, and where they come from.
LOADER_OPTIONS_FROM_ELSEWHERE = {
    "backend": "data.loader",
    "channels_last": "train.channels_last",
    "seed": "train.seed",
    "load_masks": "per split: the split's manifest",
    "mean": "ImageNet's",
    "std": "ImageNet's",
}


def loader_options(cfg: Config) -> LoaderOptions:
    """The data section of the config as the input pipeline's options: every field of the same
    name, the automatic sizes resolved, and :data:`LOADER_OPTIONS_FROM_ELSEWHERE`."""
    data = cfg.data
    same_name = {f.name for f in fields(LoaderOptions)} & {f.name for f in fields(data)}
    resize_size, crop_size = data.resolved_sizes()
    options = LoaderOptions(
        **{name: getattr(data, name) for name in same_name},
        backend=data.loader,
        channels_last=cfg.train.channels_last,
        seed=cfg.train.seed,
    )
    return replace(options, resize_size=resize_size, crop_size=crop_size)


def pseudo_box_dir(cfg: Config, data_root: Path) -> str:
    """``data.pseudo_boxes`` as an absolute path (relative ones are under the data root), or ""."""
    if not cfg.data.pseudo_boxes:
        return ""
    path = Path(cfg.data.pseudo_boxes)
    return str(path if path.is_absolute() else data_root / path)


def seed_everything(seed: int, rank: int) -> None:
    """Different streams per rank (augmentation, drops), reproducible per (seed, rank)."""
    value = seed * 1000 + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast on GPU by default; on CPU only when asked (it is slower there)."""
    enabled = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def unwrap(model: torch.nn.Module) -> WSOLMethod:
    """The method under DDP and/or torch.compile wrappers."""
    inner: Any = model
    while True:
        if hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        elif isinstance(inner, torch.nn.parallel.DistributedDataParallel):
            inner = inner.module
        else:
            return inner


class _ProgressBar:
    """A per-epoch bar on rank 0 with images/s and the data-wait fraction.

    Inside Ray it uses Ray's tqdm, which renders in the driver's console instead of
    interleaving carriage returns from many processes.
    """

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int) -> None:
        self.bar = None
        if not enabled:
            return
        try:
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover - Ray is a hard dependency
            from tqdm import tqdm  # type: ignore[no-redef]
        self.prefix = f"epoch {epoch + 1}/{epochs}"
        self.bar = tqdm(total=total, desc=self.prefix)

    def update(self, images_per_s: float, data_wait: float, loss: float) -> None:
        if self.bar is not None:
            # Ray's tqdm has no set_postfix; the figures go into the description.
            self.bar.set_description(
                f"{self.prefix} | {images_per_s:.0f} img/s | data wait {data_wait:.0%} | loss {loss:.3f}"
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _ProgressLines:
    """Plain progress lines for logs that are not a terminal (``ray job logs``, SLURM output files,
    CI, ``> log``), where a redrawn bar becomes hundreds of lines: one line every ``every``
    seconds, and one when the epoch ends."""

    def __init__(self, enabled: bool, total: int, epoch: int, epochs: int, every: float = 30.0) -> None:
        self.enabled, self.total, self.every = enabled, total, every
        self.prefix = f"epoch {epoch + 1}/{epochs}"
        self.steps = 0
        self.start = self.last = time.perf_counter()
        self.figures = ""

    def update(self, images_per_s: float, data_wait: float, loss: float) -> None:
        self.steps += 1
        self.figures = f"{images_per_s:.0f} img/s | data wait {data_wait:.0%} | loss {loss:.3f}"
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every and self.steps < self.total:
            self.last = now
            self._say(f"[wsol] {self.prefix} step {self.steps}/{self.total} | {self.figures}")

    def close(self) -> None:
        if self.enabled:
            self._say(
                f"[wsol] {self.prefix} done: {self.steps} steps in {time.perf_counter() - self.start:.0f} s | {self.figures}"
            )

    @staticmethod
    def _say(line: str) -> None:
        # To the process's own stdout: Ray Train's patched print() also tees to a wrapped
        # sys.stdout (MLflow wraps it), and every line would reach the log twice.
        print(line, file=sys.__stdout__, flush=True)


def progress_display(show: bool | str, total: int, epoch: int, epochs: int):
    """``"bar"`` (or True): a live bar for a terminal; ``"lines"``: plain periodic lines; False: none."""
    if show == "lines":
        return _ProgressLines(True, total, epoch, epochs, float(os.environ.get("WSOL_PROGRESS_EVERY", "30")))
    return _ProgressBar(bool(show), total, epoch, epochs)


def train_one_epoch(
    model: torch.nn.Module,
    method: WSOLMethod,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: Config,
    device: torch.device,
    epoch: int,
    steps_per_epoch: int,
    show_progress: bool | str,
) -> dict[str, float]:
    """One pass over the rank's shard; returns the epoch's mean losses, lr and throughput."""
    model.train()
    totals: dict[str, float] = {}
    images_seen, steps = 0, 0
    wait_seconds = 0.0
    total_steps = cfg.train.epochs * steps_per_epoch
    bar = progress_display(show_progress, steps_per_epoch, epoch, cfg.train.epochs)
    skipped_before = loader.skipped.total if hasattr(loader, "skipped") else 0
    epoch_start = tick = time.perf_counter()
    iterator = iter(loader)
    while True:
        try:
            batch: Batch = next(iterator)
        except StopIteration:
            break
        got_batch = time.perf_counter()
        wait_seconds += got_batch - tick
        batch = batch.to(device)
        progress = min(1.0, (epoch * steps_per_epoch + steps) / max(total_steps, 1))
        with autocast_context(cfg, device):
            outputs = model(batch.images, batch.labels, progress)
            terms = method.losses(outputs, batch)
        loss = cast(torch.Tensor, sum(terms.values()))  # every method returns at least one term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        method.after_step(epoch * steps_per_epoch + steps + 1, outputs)

        # One host sync per step for the logged values (loss terms, then what the terms use:
        # mask areas and schedule values); cheap next to a WSOL step.
        seen = step_statistics(method, outputs)
        logged = {f"loss_{name}": value for name, value in terms.items()} | seen
        flat = torch.stack([v.detach().float().reshape(()).to(loss.device) for v in logged.values()]).tolist()
        values = dict(zip(logged, flat))
        losses_now = {k: v for k, v in values.items() if k.startswith("loss_")}
        if not all(math.isfinite(v) for v in losses_now.values()):
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {steps + 1}: {losses_now}")
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value
        images_seen += len(batch)
        steps += 1
        tick = time.perf_counter()
        elapsed = tick - epoch_start
        bar.update(images_seen / max(elapsed, 1e-9), wait_seconds / max(elapsed, 1e-9), sum(losses_now.values()))
    bar.close()
    if steps == 0:
        raise RuntimeError(
            f"epoch {epoch + 1}: the training loader yielded no batch (dataset smaller than one batch per worker?)"
        )
    elapsed = time.perf_counter() - epoch_start
    world = dist.get_world_size() if dist.is_initialized() else 1
    metrics = {f"train/{name}": total / steps for name, total in totals.items()}
    metrics["train/loss"] = sum(v for k, v in totals.items() if k.startswith("loss_")) / steps
    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
    # Every rank sees the same number of batches, so the global rate is world x the local one.
    metrics["train/images_per_s"] = images_seen * world / elapsed
    metrics["train/data_wait"] = wait_seconds / elapsed
    # Bad samples left out this epoch (data.skip_corrupt), over every rank.
    skipped = torch.tensor(
        [float((loader.skipped.total if hasattr(loader, "skipped") else 0) - skipped_before)], device=device
    )
    if dist.is_initialized():
        dist.all_reduce(skipped)
    metrics["train/skipped_samples"] = float(skipped.item())
    return metrics


def step_statistics(method: WSOLMethod, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the loss terms used this step: the method's diagnostics (e.g. FMCG's theta_d) and
    the area of each loss mask as a fraction of the map (``mask_<name>_area``)."""
    stats = dict(method.diagnostics(outputs))
    for name, mask in method.loss_masks(outputs).items():
        stats[f"mask_{name}_area"] = mask.detach().float().mean()
    return stats


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's floating-point buffers (BatchNorm running statistics) on every rank.

    DDP broadcasts buffers at the start of each training forward, but every rank's last step then
    updates its own copy, so after an epoch the ranks hold slightly different models. Evaluation
    is split over the ranks and rank 0 saves the checkpoint: all must be rank 0's model, or the
    in-training score is not the saved model's (seen: test 23.6 in training, 25.0 offline)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.broadcast(buffer, src=0)


def _restore(model: WSOLMethod, optimizer, scheduler, device, plan: dict | None) -> TrainingState | None:
    """The training state to continue from: the checkpoint the driver verified (``plan``), or
    one this fit wrote since (Ray hands it after a worker failure); None for a fresh start."""
    import ray.train

    from wsol_core.train.resume import pick_checkpoint

    handed = ray.train.get_checkpoint()
    directory = pick_checkpoint(handed.path if handed is not None else None, plan)
    if directory is None:
        return None
    if handed is not None and directory == handed.path:
        with handed.as_directory() as local:
            state = load_training_state(local, map_location=device)
    else:
        state = load_training_state(directory, map_location=device)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    restore_rng_states(state.rng)
    return state


def _report(metrics: dict[str, float], state: TrainingState | None) -> None:
    """Report to Ray; rank 0 attaches the checkpoint (the others report metrics only)."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="wsol-ckpt-") as directory:
        save_training_state(directory, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _log_pictures(logger: RunLogger, outcome: EvalOutcome, split: str, epoch: int) -> None:
    if not logger.enabled:
        return
    import matplotlib.pyplot as plt

    if outcome.overlay is not None:
        logger.log_figure(outcome.overlay, f"{split}/cams/epoch_{epoch:03d}.png")
        plt.close(outcome.overlay)
    if outcome.curves is not None:
        logger.log_figure(outcome.curves, f"{split}/box_accuracy_vs_threshold/epoch_{epoch:03d}.png")
        plt.close(outcome.curves)
    if outcome.pr_curve is not None:
        logger.log_figure(outcome.pr_curve, f"{split}/pxap_pr_curve/epoch_{epoch:03d}.png")
        plt.close(outcome.pr_curve)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config["context"]`` is the run's
    :class:`~wsol_core.train.context.RunContext` (handed over by :mod:`wsol_core.train.trainer`)."""
    import ray.train
    import ray.train.torch

    run = loop_config["context"]
    cfg = run.config
    config_record = to_dict(cfg)  # what checkpoints store and compare on resume
    data_root = Path(run.data_root)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(cfg.train.seed, rank)
    from wsol_core.tracking import RunLogger

    logger = RunLogger(run.tracking_uri, run.mlflow_run_id, enabled=rank == 0)

    # Model, optimizer, schedule.
    num_classes = cfg.model.num_classes or load_manifest(data_root / "train").num_classes
    method = build_method(cfg, num_classes).to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    options = replace(loader_options(cfg), pseudo_boxes=pseudo_box_dir(cfg, data_root))
    train_loader = build_loader(
        data_root / "train", split_kind="train", rank=rank, world_size=world_size, device=device, options=options
    )
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(method, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)

    restored = _restore(method, optimizer, scheduler, device, run.resume_plan)
    start_epoch = restored.epoch if restored else 0
    best_score = restored.best_score if restored else -1.0
    if rank == 0:
        if restored:
            print(f"[wsol] resuming at epoch {start_epoch + 1} from a checkpoint of epoch {restored.epoch}", flush=True)
        logger.start_system_metrics()

    model: torch.nn.Module = ray.train.torch.prepare_model(method, move_to_device=False)
    if cfg.train.compile:
        model = cast(torch.nn.Module, torch.compile(model))

    eval_options = eval_loader_options(cfg)
    val_loader = build_loader(
        data_root / "val",
        split_kind="eval",
        rank=rank,
        world_size=world_size,
        device=device,
        options=eval_options,
        batch_size=cfg.eval.batch_size,
    )
    last_val: dict[str, float] = {}
    # Val's choice of the Loc threshold (an index into the threshold grid): test is read there.
    loc_threshold_index: int | None = restored.loc_threshold_index if restored else None
    for epoch in range(start_epoch, cfg.train.epochs):
        train_loader.set_epoch(epoch)
        progress = run.progress if rank == 0 else False
        metrics = train_one_epoch(
            model, method, train_loader, optimizer, scheduler, cfg, device, epoch, steps_per_epoch, progress
        )
        method.after_epoch(epoch + 1)
        broadcast_buffers(method)
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            method.before_evaluation(next(iter(val_loader)).images.to(device))
            with eval_autocast(cfg.eval.precision, device):
                outcome = evaluate_split(
                    method, val_loader, cfg.eval, split="val", draw=rank == 0, progress=(epoch + 1) / cfg.train.epochs
                )
            last_val = outcome.metrics
            loc_threshold_index = outcome.loc_threshold_index
            _log_pictures(logger, outcome, "val", epoch + 1)
        metrics.update(last_val)
        score = val_score(last_val)
        best_score = max(best_score, score)
        metrics[SCORE_KEY] = score  # every report carries the ranking key Ray sorts checkpoints by
        metrics["epoch"] = epoch + 1
        logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
        state = None
        if rank == 0:
            state = TrainingState(
                epoch=epoch + 1,
                model=method.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                config=config_record,
                mlflow_run_id=run.mlflow_run_id,
                best_score=best_score,
                rng=capture_rng_states(),
                loc_threshold_index=loc_threshold_index,
                cam_curve_interval=cfg.eval.cam_curve_interval,
            )
        _report(metrics, state)

    # The protocol's final numbers: the test split, scored once, with the last model.
    test_metrics: dict[str, float] = {}
    if cfg.train.evaluate_test:
        test_loader = build_loader(
            data_root / "test",
            split_kind="eval",
            rank=rank,
            world_size=world_size,
            device=device,
            options=eval_options,
            batch_size=cfg.eval.batch_size,
        )
        with eval_autocast(cfg.eval.precision, device):
            outcome = evaluate_split(
                method, test_loader, cfg.eval, split="test", draw=rank == 0, loc_threshold_index=loc_threshold_index
            )
        test_metrics = outcome.metrics
        logger.log_metrics(test_metrics, step=cfg.train.epochs)
        _log_pictures(logger, outcome, "test", cfg.train.epochs)
        logger.log_dict(test_metrics, "test/metrics.json")
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="wsol-final-") as directory:
            state_file = save_training_state(
                directory,
                TrainingState(
                    epoch=cfg.train.epochs,
                    model=method.state_dict(),
                    optimizer={},
                    scheduler={},
                    config=config_record,
                    mlflow_run_id=run.mlflow_run_id,
                    best_score=best_score,
                    loc_threshold_index=loc_threshold_index,
                    cam_curve_interval=cfg.eval.cam_curve_interval,
                ),
            )
            logger.log_model(method.cpu(), state_file, run.registered_model_name)
        log_run_summary(
            logger,
            flatten(cfg),
            {**last_val, **test_metrics},
            dataset=load_manifest(data_root / "train").dataset,
            synthetic=not cfg.data.root,
        )
    ray.train.report({**test_metrics, "epoch": cfg.train.epochs, SCORE_KEY: val_score(last_val)})
    logger.stop_system_metrics()  # the driver closes the run with its final status
