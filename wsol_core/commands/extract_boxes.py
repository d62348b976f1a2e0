"""Extract pseudo boxes over a split with a trained model: the first stage of C2AM Sec. 3.4.

    uv run python jobs/extract_boxes.py --checkpoint RUN_DIR/checkpoint_000009 --split train
    uv run python jobs/extract_boxes.py --checkpoint runs:/<run_id>/model --data SHARDS --split train \\
        --out SHARDS/train.pseudo_boxes --num-workers 4 --use-gpu --log-to-mlflow <run_id>

One box per sample of ``--split``: the largest contour of the model's map at the threshold rule
``--threshold`` (``best_val``: the one chosen on val and stored with the checkpoint, the
protocol's choice; or a fixed value in [0, 1), as CVI-SZU/CCAM does), in the original image's
pixels. The map is class-agnostic for CAML / C2AM and the GT class's CAM for the other methods
(:mod:`wsol_core.extraction`). The boxes go to a sidecar folder beside the split
(:mod:`wsol_core.data.pseudo_boxes`; default ``<data>/<split>.pseudo_boxes``) that the regressor
reads. Outputs there:

    pseudo_boxes.json                  the header: the split's identity, the source, the rule
    boxes-rank<r>-of-<w>.jsonl         one line per sample, per Ray worker
    summary-rank<r>-of-<w>.json        each worker's counts; summary.json, all of them merged

Everything that can be checked is checked before any Ray work starts: the checkpoint (it must
load as a model of this project or a released one), the split (its ``dataset.json``), and the
output folder (a sidecar of another split or rule is refused; one of the same extraction is
resumed: the keys already written are not inferred again). Corrupt samples are skipped and
counted when ``data.skip_corrupt`` is on. Progress is rank 0's bar; the summary gives the counts,
img/s and, where the split has GT boxes, the pseudo boxes' CorLoc and mean IoU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wsol_core.config import ConfigError
from wsol_core.train.ray_session import RayStartError, init_ray, report_start_failure


def resolve_rule(asked: str, stored: float | None, source: str) -> tuple[str, float]:
    """``(rule, threshold)`` from ``--threshold``: ``best_val`` or a fixed value in [0, 1)."""
    from wsol_core.commands.localize import resolve_threshold

    if asked == "best_val":
        return "best_val", resolve_threshold("auto", stored, source)
    try:
        float(asked)
    except ValueError:
        raise ValueError(f"--threshold {asked!r} is neither 'best_val' nor a number") from None
    return "fixed", resolve_threshold(asked, stored, source)


def check_world_size(out: Path, world_size: int) -> None:
    """A resumed extraction must use the same number of ranks: each rank resumes its own file."""
    earlier = {p.name.rsplit("-of-", 1)[1].split(".")[0] for p in out.glob("boxes-rank*-of-*.jsonl")}
    if earlier and earlier != {str(world_size)}:
        raise ValueError(
            f"{out} holds an interrupted extraction by {', '.join(sorted(earlier))} worker(s): resume it with the "
            f"same --num-workers (now {world_size}) or delete the folder"
        )


def extract_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: this rank's share of the split into the sidecar."""
    import ray.train

    from wsol_core.extraction import extract_shards
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import inference_worker

    worker = inference_worker(config["checkpoint"], config["overrides"], config["layout"])
    summary = extract_shards(
        worker.loaded.method,
        config["split_dir"],
        config["out"],
        threshold=config["threshold"],
        device=worker.device,
        options=eval_loader_options(worker.loaded.cfg),
        batch_size=config["batch_size"],
        rank=worker.rank,
        world_size=worker.world_size,
        progress=worker.rank == 0,
    )
    ray.train.report({"extracted": summary.extracted})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, state.pt, MLflow model URI, or a released checkpoint file"
    )
    parser.add_argument("--data", default="", help="shard root (default: the run's own data)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--out", default="", help="sidecar folder (default: <data>/<split>.pseudo_boxes)")
    parser.add_argument(
        "--threshold", default="best_val", help="best_val (the checkpoint's val choice) or a fixed value in [0, 1)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (0: this process)")
    parser.add_argument("--use-gpu", action="store_true", help="run on the GPU (CUDA) when there is one")
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "wsolevaluation", "ccam"],
        help="layout of a released checkpoint file",
    )
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (for runs:/ and models:/ URIs)")
    parser.add_argument(
        "--log-to-mlflow", default="", metavar="RUN_ID", help="log the counts and the boxes' quality into this run"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    import torch

    from wsol_core.data.pseudo_boxes import SUMMARY, new_header, verify_sidecar, write_header
    from wsol_core.data.resolve import resolve_data_root
    from wsol_core.extraction import extract_shards, merge_summaries, read_summaries
    from wsol_core.models.released import ReleasedCheckpointError
    from wsol_core.tracking import RunLogger, resolve_tracking_uri
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import load_model, local_state_file

    try:
        tracking_uri = resolve_tracking_uri(args.tracking_uri) if (args.tracking_uri or args.log_to_mlflow) else ""
        checkpoint = str(local_state_file(args.checkpoint, tracking_uri))
        device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")
        loaded = load_model(checkpoint, overrides=args.overrides, device=device, layout=args.layout)
        if args.data:
            root = Path(args.data)
        elif loaded.source == "project":
            root = resolve_data_root(loaded.cfg.data)
        else:
            raise ValueError(f"{args.checkpoint} is a released {loaded.source} checkpoint: pass --data")
        split_dir = root / args.split
        if not (split_dir / "dataset.json").is_file():
            raise FileNotFoundError(f"split {args.split!r}: {split_dir} has no dataset.json (written by make_shards?)")
        out = Path(args.out) if args.out else root / f"{args.split}.pseudo_boxes"
        rule, threshold = resolve_rule(args.threshold, loaded.loc_threshold, args.checkpoint)
        map_kind = "class_agnostic" if not loaded.method.uses_labels else "gt_class_cam"
        source = {
            "checkpoint": args.checkpoint,
            "layout": loaded.source,
            "method": loaded.cfg.method.name,
            "backbone": loaded.cfg.model.backbone,
            "map": map_kind,
        }
        write_header(out, new_header(split_dir, rule, threshold, source))
        world_size = max(args.num_workers, 1)
        check_world_size(out, world_size)
        print(
            f"[wsol] extracting {split_dir} with {loaded.source} {loaded.cfg.method.name}/{loaded.cfg.model.backbone} "
            f"({map_kind} maps, {rule} threshold {threshold:.3f}) into {out}",
            flush=True,
        )
        if args.num_workers > 0:
            init_ray()  # before any ray import: it decides how workers start
            from wsol_core.train.trainer import inference_trainer

            inference_trainer(
                extract_worker,
                {
                    "checkpoint": checkpoint,
                    "split_dir": str(split_dir.resolve()),
                    "out": str(out.resolve()),
                    "threshold": threshold,
                    "overrides": args.overrides,
                    "layout": args.layout,
                    "batch_size": args.batch_size,
                },
                num_workers=args.num_workers,
                use_gpu=args.use_gpu,
                purpose="extract",
            ).fit()
        else:
            extract_shards(
                loaded.method,
                split_dir,
                out,
                threshold=threshold,
                device=device,
                options=eval_loader_options(loaded.cfg),
                batch_size=args.batch_size,
            )
        summary = merge_summaries(read_summaries(out))
        (out / SUMMARY).write_text(json.dumps(asdict(summary) | {"quality": summary.quality()}, indent=2) + "\n")
        verify_sidecar(out, split_dir)
    except (ConfigError, FileNotFoundError, ValueError, ReleasedCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:  # a busy machine, said plainly: no internal traceback
        return report_start_failure(err)
    quality = summary.quality()
    print(
        f"[wsol] {summary.extracted} boxes extracted, {summary.resumed} resumed, {summary.skipped} skipped, "
        f"{summary.images_per_s:.1f} img/s; CorLoc {quality['corloc']:.2f}, mean IoU {quality['mean_iou']:.2f} "
        f"over {int(quality['images'])} images with GT; sidecar {out}"
    )
    if args.log_to_mlflow:
        metrics = {f"pseudo/{k}": float(v) for k, v in quality.items()}
        metrics |= {f"pseudo/{k}": float(getattr(summary, k)) for k in ("extracted", "resumed", "skipped")}
        metrics["pseudo/images_per_s"] = summary.images_per_s
        RunLogger(tracking_uri, args.log_to_mlflow).log_metrics(metrics, step=0)
    return 0
