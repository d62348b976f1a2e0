"""Command-line options shared by the entry points (``jobs/``, ``tune/``, ``cluster/``).

Each shortcut option (``--method fmcg``) is only sugar for a dotted override
(``--set method.name=fmcg``); everything ends in :func:`wsol_core.config.load_config`, so the
entry points validate identically and fail before Ray starts.
"""

from __future__ import annotations

import argparse

from wsol_core.config import Config, load_config

# option -> (dotted field, argparse kwargs)
_SHORTCUTS: dict[str, tuple[str, dict]] = {
    "--data": (
        "data.root",
        {"metavar": "DIR", "help": "shard root with train/, val/, test/ (default: generated synthetic data)"},
    ),
    "--method": (
        "method.name",
        {"help": "cam, fmcg, icl, caml, c2am, or regressor (the second stage; needs data.pseudo_boxes)"},
    ),
    "--backbone": ("model.backbone", {"help": "vgg16, resnet50, inception_v3 or tiny"}),
    "--pretrained": (
        "model.pretrained",
        {"metavar": "PATH", "help": "torchvision-format ImageNet weights, or 'torchvision' (online)"},
    ),
    "--epochs": ("train.epochs", {"type": int}),
    "--batch-size": ("data.batch_size", {"type": int, "help": "per worker"}),
    "--lr": ("optim.lr", {"type": float}),
    "--num-workers": ("run.num_workers", {"type": int, "help": "Ray Train workers (one per GPU)"}),
    "--cpus-per-worker": ("run.cpus_per_worker", {"type": float}),
    "--name": ("run.name", {"help": "run name; the same name and storage path resume the run"}),
    "--storage-path": (
        "run.storage_path",
        {"metavar": "DIR", "help": "Ray Train checkpoints and results (shared storage on clusters)"},
    ),
    "--tracking-uri": (
        "run.tracking_uri",
        {"metavar": "URI", "help": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"},
    ),
    "--experiment": ("run.experiment", {"help": "MLflow experiment (default: the dataset name)"}),
    "--seed": ("train.seed", {"type": int}),
    "--resume-from": (
        "run.resume_from",
        {
            "metavar": "CHECKPOINT_DIR",
            "help": "continue from this checkpoint of the run (default: the newest good one)",
        },
    ),
}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE|PRESET",
        help="YAML file or shipped preset name; repeatable, later wins",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="dotted override, e.g. method.srd.theta_drop=0.8; repeatable",
    )
    for option, (_, kwargs) in _SHORTCUTS.items():
        parser.add_argument(option, default=None, **kwargs)
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        default=None,
        help="a fresh run under a new name, even if this name has checkpoints",
    )


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> Config:
    """Defaults <- ``base`` <- ``--config`` files <- shortcut options <- ``--set`` overrides."""
    overrides = []
    for option, (dotted, _) in _SHORTCUTS.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None:
            overrides.append(f"{dotted}={value}")
    if args.use_gpu:
        overrides.append("run.use_gpu=true")
    if getattr(args, "no_resume", None):
        overrides.append("run.resume=never")
    return load_config(args.config, overrides + list(args.overrides), base=base)
