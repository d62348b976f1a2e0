"""Score a trained checkpoint on a shard split with the protocol's metrics.

    uv run python jobs/evaluate.py --checkpoint RUN_DIR/checkpoint_... --data SHARDS --split test
    uv run python jobs/evaluate.py --checkpoint runs:/<run_id>/model --split test --num-workers 2
    uv run python jobs/evaluate.py --checkpoint vgg16_cam_cub.pth.tar --data SHARDS --split test

The checkpoint is a Ray checkpoint directory, a ``state.pt`` file, an MLflow model URI logged by
the training job, or a released checkpoint of the field: clovaai/wsolevaluation's CAM models
(``last_checkpoint.pth.tar``) or CVI-SZU/CCAM's C2AM models (``--layout`` picks one; by default
the keys tell). Without --data, the run's own data (from its config) is used. GT-known / Top-k
Loc on test are read at the threshold chosen on val (``--loc-threshold``). ``--classifier``
pairs a class-agnostic localizer (the box regressor, CAML, C2AM) with another checkpoint's
class scores for Top-1 / Top-5 Loc, as PSOL and C2AM + PSOL report them. Prints a table,
writes JSON (--out), and optionally logs to MLflow (--log-to-mlflow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wsol_core.config import ConfigError
from wsol_core.train.ray_session import RayStartError, report_start_failure


def stage_picture(first_stage: str, model: str, split_dir: Path, tracking_uri: str, layout: str):
    """GT, the first stage's map box and the model's box on the split's first 8 images."""
    from wsol_core.extraction import compare_boxes
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import load_model

    first = load_model(first_stage, tracking_uri=tracking_uri, layout=layout)
    second = load_model(model, tracking_uri=tracking_uri, layout=layout)
    return compare_boxes(
        {
            f"first stage ({first.cfg.method.name})": (first.method, first.loc_threshold or 0.5),
            second.cfg.method.name: (second.method, second.loc_threshold or 0.5),
        },
        split_dir,
        options=eval_loader_options(second.cfg),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, state.pt, or MLflow model URI")
    parser.add_argument("--data", default="", help="shard root (default: the run's own data)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--interval", type=float, default=0.001, help="CAM threshold step (protocol: 0.001)")
    parser.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (0: this process)")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument(
        "--tracking-uri", default="", help="MLflow tracking URI (for models:/ and runs:/ URIs and logging)"
    )
    parser.add_argument("--log-to-mlflow", default="", metavar="RUN_ID", help="log the metrics into this MLflow run")
    parser.add_argument("--out", default="", help="write the metrics as JSON here")
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "wsolevaluation", "ccam"],
        help="layout of a released checkpoint file",
    )
    parser.add_argument(
        "--classifier",
        default="",
        help="a checkpoint whose class scores give Top-1/Top-5 Loc (PSOL's pairing, e.g. for the box regressor)",
    )
    parser.add_argument(
        "--first-stage",
        default="",
        metavar="CHECKPOINT",
        help="also score this checkpoint (the model whose pseudo boxes trained --checkpoint) as first_stage/..., "
        "and with --log-to-mlflow log a picture of the GT, its box and --checkpoint's box",
    )
    parser.add_argument(
        "--loc-threshold",
        default="auto",
        help="where GT-known / Top-k Loc are read: auto (the model's val threshold, else a val split beside --data's split), self, or a value in [0, 1)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.interval < 1:
        parser.error(f"--interval {args.interval} must be in (0, 1)")

    from wsol_core.data.resolve import resolve_data_root
    from wsol_core.models.released import ReleasedCheckpointError
    from wsol_core.tracking import RunLogger, resolve_tracking_uri
    from wsol_core.train.offline_eval import evaluate_checkpoint, load_model

    try:
        tracking_uri = resolve_tracking_uri(args.tracking_uri) if (args.tracking_uri or args.log_to_mlflow) else ""
        root = Path(args.data) if args.data else None
        if root is None:
            loaded = load_model(
                args.checkpoint, tracking_uri=tracking_uri, overrides=args.overrides, layout=args.layout
            )
            if loaded.source != "project":
                raise ValueError(
                    f"{args.checkpoint} is a released {loaded.source} checkpoint: pass --data (it carries no data location)"
                )
            root = resolve_data_root(loaded.cfg.data)
        scoring = dict(
            split=args.split,
            interval=args.interval,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            tracking_uri=tracking_uri,
            layout=args.layout,
            classifier=args.classifier,
        )
        metrics = evaluate_checkpoint(
            args.checkpoint,
            root / args.split,
            overrides=args.overrides,
            loc_threshold=args.loc_threshold,
            **scoring,
        )
        if args.first_stage:  # its own config and val threshold; --set is for --checkpoint
            first = evaluate_checkpoint(args.first_stage, root / args.split, **scoring)
            metrics |= {f"first_stage/{k}": v for k, v in first.items()}
    except (ConfigError, FileNotFoundError, ValueError, ReleasedCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:  # a busy machine, said plainly: no internal traceback
        return report_start_failure(err)
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
    if args.log_to_mlflow:
        logger = RunLogger(tracking_uri, args.log_to_mlflow)
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=0)
        if args.first_stage:
            logger.log_figure(
                stage_picture(args.first_stage, args.checkpoint, root / args.split, tracking_uri, args.layout),
                f"eval/{args.split}_first_stage_vs_model.png",
            )
    return 0
