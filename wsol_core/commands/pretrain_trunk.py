"""Pretrain a trunk on a disjoint many-class synthetic task and export it like ImageNet weights.

    uv run wsol-pretrain-trunk                  # 120 classes, the tiny backbone; prints the file
    uv run python jobs/train_imagenet.py --pretrained ~/.cache/wsol/trunks/tiny-<key>.pth ...

WSOL fine-tunes an ImageNet-pretrained trunk; none can be downloaded where this project is
proven, so this is the proxy (issue 16):

1. the task's shards (:mod:`wsol_core.data.synthetic_pretrain`: 120 classes of shapes x textures
   x palettes, none of them the WSOL benchmark's creatures) are generated once into the cache;
2. a GAP classifier is trained on them by the training job itself (Ray Train, MLflow,
   checkpoints; the same command resumes it) with :data:`RECIPE`, under your ``--config`` /
   ``--set`` / ``--epochs`` / ``--seed``;
3. the trunk is exported as a torchvision-format state dict (:func:`export_trunk`: the pretrained
   stages and the classifier as ``fc.*``, without the layers the protocol adds new), with a JSON
   beside it that records the task, the recipe, the seed, the val accuracy and the wall time.

The file is named by a hash of everything that shaped it (task, recipe, seed) and kept in the
cache like the synthetic shards: the same command finds it and trains nothing. Fine-tuning then
takes it through ``model.pretrained=PATH``, the path a user takes with real weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from wsol_core.cli import add_config_options, config_from_args
from wsol_core.config import Config, ConfigError, flatten, to_dict

# The pretraining recipe: ImageNet training's shape scaled to a CPU budget. SGD with momentum
# 0.9 and weight decay 5e-4 (VGG's ImageNet recipe), a random-resized crop and a flip
# (torchvision's reference recipe), a half-cosine to zero after half an epoch of warm-up, so the
# short run ends settled. lr 0.05 at batch 64 is 5x the job's from-scratch default: every layer
# is new, the batch is twice the ablation's, and the warm-up guards the start. BENCHMARKS.md
# "A pretrained trunk" records the val top-1 this reaches per epoch and the wall time.
RECIPE: dict = {
    "method": {"name": "cam"},  # a GAP classifier: what CAM trains is exactly that
    "model": {"backbone": "tiny", "pretrained": None},
    "optim": {
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "head_lr_mult": 1.0,  # every layer is new here: no trunk/head split to honour
        "schedule": "cosine",
        "warmup_epochs": 0.5,
    },
    "data": {
        # The WSOL benchmark's geometry (128 px images, 112 px crops: a 14 x 14 map on tiny), not
        # the 256 / 224 a data root gets by default.
        "resize_size": 128,
        "crop_size": 112,
        "random_resized_crop": True,
        "rrc_scale": [0.25, 1.0],
        "hflip": True,
        "batch_size": 32,
    },
    "train": {"epochs": 8, "keep_best": 1},
    "eval": {"num_vis_images": 0},
    "run": {"num_workers": 2, "cpus_per_worker": 1.0, "experiment": "synthetic-pretrain"},
}


@dataclass(frozen=True)
class TaskOptions:
    """The pretraining task's data (see :mod:`wsol_core.data.synthetic_pretrain`)."""

    classes: int = 120
    per_class: int = 150
    val_per_class: int = 5
    test_per_class: int = 2
    size: int = 128
    seed: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser().resolve() / "wsol"


def task_dir(task: TaskOptions, root: Path) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(task), sort_keys=True).encode()).hexdigest()[:12]
    return root / "synthetic-pretrain" / f"pretrain-{task.size}px-{task.classes}c-{digest}"


def ensure_task(task: TaskOptions, root: Path) -> Path:
    """The task's shards, written on first use (resumable; see :func:`wsol_core.data.resolve.write_once`)."""
    from wsol_core.data.resolve import write_once
    from wsol_core.data.synthetic_pretrain import PretrainTaskConfig, write_pretrain_task

    return write_once(
        task_dir(task, root),
        f"the {task.classes}-class pretraining task",
        lambda out: write_pretrain_task(
            out,
            num_train=task.classes * task.per_class,
            num_val=task.classes * task.val_per_class,
            num_test=task.classes * task.test_per_class,
            config=PretrainTaskConfig(size=task.size, num_classes=task.classes),
            seed=task.seed,
        ),
    )


def trunk_key(task: TaskOptions, cfg: Config) -> str:
    """A hash of what shapes the weights: the task and every config field outside ``run``
    (where and under which name the run is kept does not change the weights)."""
    recipe = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(("run.", "data.root"))}
    text = json.dumps({"task": asdict(task), "recipe": recipe}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser)
    defaults = TaskOptions()
    parser.add_argument("--classes", type=int, default=defaults.classes, help="classes of the task (2-120)")
    parser.add_argument("--per-class", type=int, default=defaults.per_class, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=defaults.val_per_class)
    parser.add_argument("--test-per-class", type=int, default=defaults.test_per_class)
    parser.add_argument("--size", type=int, default=defaults.size, help="image side in px")
    parser.add_argument("--data-seed", type=int, default=defaults.seed, help="the task generator's seed")
    parser.add_argument("--cache-dir", default="", help="where shards and trunks are kept (default: ~/.cache/wsol)")
    parser.add_argument("--out", default="", help="the trunk file (default: <cache>/trunks/<backbone>-<key>.pth)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    args = parser.parse_args(argv)

    task = TaskOptions(args.classes, args.per_class, args.val_per_class, args.test_per_class, args.size, args.data_seed)
    try:
        from wsol_core.data.synthetic_pretrain import PretrainTaskConfig

        PretrainTaskConfig(size=task.size, num_classes=task.classes)  # its checks, before anything runs
        if min(task.per_class, task.val_per_class, task.test_per_class) < 1:
            raise ValueError("--per-class, --val-per-class and --test-per-class must be at least 1")
        cfg = config_from_args(args, base=RECIPE)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    root = Path(args.cache_dir).expanduser().resolve() if args.cache_dir else cache_root()
    key = trunk_key(task, cfg)
    out = Path(args.out).expanduser().resolve() if args.out else root / "trunks" / f"{cfg.model.backbone}-{key}.pth"
    card = out.with_suffix(".json")
    if out.is_file() and card.is_file() and json.loads(card.read_text()).get("key") == key:
        print(f"[wsol] trunk already pretrained (key {key}): {out}")
        print(f"[wsol] fine-tune from it with --pretrained {out}")
        return 0

    data_root = ensure_task(task, root)
    if not cfg.run.name:
        cfg.run.name = f"pretrain-{cfg.model.backbone}-{key}"
    cfg.data.root = str(data_root)

    from wsol_core.models.export import export_trunk
    from wsol_core.train.driver import run_training
    from wsol_core.train.ray_session import RayStartError, report_start_failure

    began = time.monotonic()
    try:
        outcome = run_training(cfg, ray_address=args.ray_address)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:
        return report_start_failure(err)
    except KeyboardInterrupt as stop:  # the driver closed the run and said how to resume
        return getattr(stop, "exit_code", 130)
    if outcome.checkpoint_path is None:
        print(f"error: run {outcome.run_name!r} finished without a checkpoint to export", file=sys.stderr)
        return 1
    state = export_trunk(outcome.checkpoint_path, out)
    metrics = outcome.metrics
    card.write_text(
        json.dumps(
            {
                "key": key,
                "weights": str(out),
                "tensors": len(state),
                "task": asdict(task),
                "data_root": str(data_root),
                "recipe": {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("run.")},
                "checkpoint": outcome.checkpoint_path,
                "mlflow_run_id": outcome.mlflow_run_id,
                "tracking_uri": outcome.tracking_uri,
                "val_top1_acc": metrics.get("val/top1_acc"),
                "test_top1_acc": metrics.get("test/top1_acc"),
                "wall_s_this_session": round(time.monotonic() - began, 1),
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(
        f"[wsol] pretrained trunk: {out} (val top-1 {metrics.get('val/top1_acc', float('nan')):.2f} %, "
        f"test top-1 {metrics.get('test/top1_acc', float('nan')):.2f} %)"
    )
    print(f"[wsol] fine-tune from it with --pretrained {out}")
    return 0
