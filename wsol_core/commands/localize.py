"""Localize your own pictures with a trained model: class, score and boxes per image.

    uv run python jobs/localize.py --checkpoint runs:/<run_id>/model --images photos/ --out found/
    uv run python jobs/localize.py --checkpoint RUN_DIR/checkpoint_000009 --images SHARDS/test --out found/ --num-workers 4 --use-gpu

``--images`` is a folder of pictures (searched recursively) or a shard split directory (with
``dataset.json``). For every image it writes the predicted class and probability, the box of the
largest contour (the published Loc box) and every contour's box, in the image's own pixels, at
the threshold chosen on val and stored with the model (``--threshold`` overrides; a released
checkpoint has none and needs it). Outputs in ``--out``:

    predictions.jsonl, predictions.csv   one row per image
    overlays/<image>.png                 the map over the picture, boxes drawn (--no-overlays to skip)
    contact_sheet.png                    all overlays as thumbnails (--contact-sheet)
    maps/<image>.npy                     the normalized 224x224 map (--save-maps)
    summary.json                         counts, skipped images with the reason, images/s

Unreadable images are named, skipped and counted in the summary. Shard input can be spread over
Ray Train workers (``--num-workers``, GPUs with ``--use-gpu``); ``--out`` must then be on a
filesystem every node sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from wsol_core.config import ConfigError
from wsol_core.train.ray_session import RayStartError, init_ray, report_start_failure


def resolve_threshold(asked: str, stored: float | None, source: str) -> float:
    if asked == "auto":
        if stored is None:
            raise ValueError(
                f"{source} stores no threshold chosen on val (a released checkpoint?): pass --threshold VALUE"
            )
        return stored
    value = float(asked)
    if not 0 <= value < 1:
        raise ValueError(f"--threshold {value} must be in [0, 1)")
    return value


def class_names_for(loaded, names_file: str) -> list[str] | None:
    if names_file:
        return [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
    try:  # the run's own training split names its classes
        from wsol_core.data.manifest import load_manifest
        from wsol_core.data.resolve import resolve_data_root

        return list(load_manifest(resolve_data_root(loaded.cfg.data) / "train").class_names) or None
    except Exception:
        return None


def localize_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: this rank's share of a shard split into ``out/rank_<r>``."""
    import ray.train

    from wsol_core.localize import localize_shards
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import inference_worker

    worker = inference_worker(config["checkpoint"], config["overrides"], config["layout"])
    rank = worker.rank
    summary = localize_shards(
        worker.loaded.method,
        Path(config["images"]),
        Path(config["out"]) / f"rank_{rank}",
        threshold=config["threshold"],
        device=worker.device,
        options=eval_loader_options(worker.loaded.cfg),
        batch_size=config["batch_size"],
        rank=rank,
        world_size=worker.world_size,
        overlays=config["overlays"],
        save_maps=config["save_maps"],
        class_names=config["class_names"],
        progress=rank == 0,
    )
    ray.train.report({"localized": summary.localized})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint dir, state.pt, MLflow model URI, or a released checkpoint file"
    )
    parser.add_argument("--images", required=True, help="a folder of pictures or a shard split directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--threshold",
        default="auto",
        help="CAM threshold in [0, 1) (default: the one chosen on val, stored with the model)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=2, help="image decoding workers (folder input)")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="Ray Train workers for shard input (0: this process)"
    )
    parser.add_argument("--use-gpu", action="store_true", help="run on the GPU (CUDA) when there is one")
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--contact-sheet", action="store_true")
    parser.add_argument("--save-maps", action="store_true", help="also write the normalized maps as .npy")
    parser.add_argument(
        "--class-names", default="", help="a text file, one class name per line (default: the run's manifest)"
    )
    parser.add_argument(
        "--layout",
        default="auto",
        choices=["auto", "wsolevaluation", "ccam"],
        help="layout of a released checkpoint file",
    )
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (for runs:/ and models:/ URIs)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")

    import torch

    from wsol_core.localize import localize_folder, localize_shards, merge_rank_outputs
    from wsol_core.models.released import ReleasedCheckpointError
    from wsol_core.tracking import resolve_tracking_uri
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import load_model, local_state_file

    images, out = Path(args.images), Path(args.out)
    try:
        if not images.is_dir():
            raise FileNotFoundError(f"--images {images}: not a directory")
        tracking_uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else ""
        checkpoint = str(local_state_file(args.checkpoint, tracking_uri))
        device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")
        loaded = load_model(checkpoint, overrides=args.overrides, device=device, layout=args.layout)
        threshold = resolve_threshold(args.threshold, loaded.loc_threshold, args.checkpoint)
        names = class_names_for(loaded, args.class_names)
        shards = (images / "dataset.json").is_file()
        print(
            f"[wsol] {loaded.source} model {loaded.cfg.method.name}/{loaded.cfg.model.backbone} on {device}; threshold {threshold:.3f}"
            + (f"; {loaded.note}" if loaded.note else ""),
            flush=True,
        )
        if shards and args.num_workers > 0:
            init_ray()  # before any ray import: it decides how workers start
            from wsol_core.train.trainer import inference_trainer

            out.mkdir(parents=True, exist_ok=True)
            inference_trainer(
                localize_worker,
                {
                    "checkpoint": checkpoint,
                    "images": str(images.resolve()),
                    "out": str(out.resolve()),
                    "threshold": threshold,
                    "overrides": args.overrides,
                    "layout": args.layout,
                    "batch_size": args.batch_size,
                    "overlays": not args.no_overlays,
                    "save_maps": args.save_maps,
                    "class_names": names,
                },
                num_workers=args.num_workers,
                use_gpu=args.use_gpu,
                purpose="localize",
            ).fit()
            summary = merge_rank_outputs(out, sorted(out.glob("rank_*")), args.contact_sheet)
        elif shards:
            summary = localize_shards(
                loaded.method,
                images,
                out,
                threshold=threshold,
                device=device,
                options=eval_loader_options(loaded.cfg),
                batch_size=args.batch_size,
                overlays=not args.no_overlays,
                sheet=args.contact_sheet,
                save_maps=args.save_maps,
                class_names=names,
            )
        else:
            summary = localize_folder(
                loaded.method,
                images,
                out,
                threshold=threshold,
                device=device,
                batch_size=args.batch_size,
                num_threads=args.num_threads,
                overlays=not args.no_overlays,
                sheet=args.contact_sheet,
                save_maps=args.save_maps,
                class_names=names,
            )
    except (ConfigError, FileNotFoundError, ValueError, ReleasedCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RayStartError as err:  # a busy machine, said plainly: no internal traceback
        return report_start_failure(err)
    print(json.dumps({k: v for k, v in summary.__dict__.items() if k != "skipped"} | {"skipped": len(summary.skipped)}))
    print(
        f"[wsol] {summary.localized} of {summary.images} images localized into {out} ({len(summary.skipped)} skipped), {summary.images_per_s:.1f} img/s"
    )
    return 0
