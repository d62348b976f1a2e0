"""Write WebDataset shards (tar + DALI index + dataset.json per split) for WSOL training.

    python jobs/make_shards.py synthetic --out data/synthetic
    python jobs/make_shards.py wsolmeta --images dataset/CUB --metadata metadata/CUB --out data/cub
    python jobs/make_shards.py cub --root CUB_200_2011 --out data/cub_raw
    python jobs/make_shards.py imagenet --train ILSVRC/train --val ILSVRC/val --boxes ILSVRC/boxes --out data/imagenet
    python jobs/make_shards.py index data/imagenet/val          # rebuild missing .idx files
    python jobs/make_shards.py verify data/imagenet/val --full  # check counts, index files, hashes

Runs are resumable: finished shards are verified by their SHA-256 and kept; re-running the same
command rewrites only what is missing or damaged. The same input and options give the same bytes.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from wsol_core.data.writer import WriterOptions


def _bytes(text: str) -> int | None:
    """``1G``, ``500M``, ``64k`` or a plain number of bytes; ``0``/``none`` for no byte limit."""
    t = text.strip().lower()
    if t in ("0", "none", ""):
        return None
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1], 1)
    return int(float(t[:-1] if t[-1] in "kmg" else t) * mult)


def _add_writer_options(
    p: argparse.ArgumentParser, *, default_bytes: str = "1G", default_samples: int | None = None
) -> None:
    g = p.add_argument_group("shards")
    g.add_argument(
        "--shard-bytes",
        type=_bytes,
        default=_bytes(default_bytes),
        metavar="SIZE",
        help=f"max bytes per shard, e.g. 1G, 200M; 0 for none (default {default_bytes})",
    )
    g.add_argument("--shard-samples", type=int, default=default_samples, metavar="N", help="max samples per shard")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes (default: all cores)")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the training-split shuffle (synthetic: also of the pictures)"
    )
    g.add_argument(
        "--shuffle",
        choices=["auto", "yes", "no"],
        default="auto",
        help="shuffle the sample order (auto: training splits only)",
    )
    g.add_argument("--jpeg-quality", type=int, default=95, help="quality for images that must be re-encoded")
    g.add_argument("--no-verify-decode", action="store_true", help="do not fully decode every source image")
    g.add_argument("--skip-corrupt", action="store_true", help="skip bad source images (listed in dataset.json)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _writer_options(args: argparse.Namespace) -> WriterOptions:
    return WriterOptions(
        shard_max_samples=args.shard_samples,
        shard_max_bytes=args.shard_bytes,
        workers=max(1, args.workers),
        shuffle={"auto": None, "yes": True, "no": False}[args.shuffle],
        seed=args.seed,
        jpeg_quality=args.jpeg_quality,
        verify_decode=not args.no_verify_decode,
        skip_corrupt=args.skip_corrupt,
        progress=not args.no_progress,
    )


def _split_roots(items: list[str]) -> dict[str, str | Path]:
    out: dict[str, str | Path] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--split-images expects SPLIT=DIR, got {item!r}")
        out[split] = path
    return out


def _report(results: dict) -> None:
    for res in results.values():
        m = res.manifest
        converted = {k: v for k, v in m.conversions.items() if k != "kept"}
        print(
            f"{res.split_dir}: {m.num_samples} samples in {len(m.shards)} shards "
            f"(written {len(res.written)}, kept {len(res.kept)}"
            + (f", corrupt rewritten {res.corrupt_rewritten}" if res.corrupt_rewritten else "")
            + f"); converted {converted or 'none'}; skipped {len(m.skipped)}; boxes clipped {m.boxes_clipped}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("wsolmeta", help="the evaluation protocol's metadata layout (CUB, ImageNet, OpenImages)")
    p.add_argument("--images", required=True, help="image root the metadata paths are relative to")
    p.add_argument(
        "--metadata", required=True, help="metadata folder with one sub-folder per split (e.g. metadata/CUB)"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--splits", nargs="*", help="splits to convert (default: every folder with an image_ids.txt)")
    p.add_argument("--masks", default=None, help="root of the PxAP mask paths (default: --images)")
    p.add_argument("--split-images", nargs="*", default=[], metavar="SPLIT=DIR", help="image root for one split")
    p.add_argument("--dataset", default=None, help="dataset name (default: the metadata folder's name)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--class-names", default=None, help="file with one class name per line")
    _add_writer_options(p)

    p = sub.add_parser("cub", help="the raw CUB-200-2011 release")
    p.add_argument("--root", required=True, help="the CUB_200_2011 folder")
    p.add_argument("--out", required=True)
    _add_writer_options(p)

    p = sub.add_parser("imagenet", help="raw ILSVRC2012 folders and PASCAL-VOC box XML files")
    p.add_argument("--train", default=None, help="train folder with nXXXXXXXX class folders")
    p.add_argument("--val", default=None, help="val folder, flat or with class folders")
    p.add_argument("--boxes", default=None, help="folder searched (recursively) for the box XML files")
    p.add_argument("--synset-words", default=None, help="'nXXXXXXXX name' lines to name the classes")
    p.add_argument("--out", required=True)
    _add_writer_options(p)

    p = sub.add_parser("synthetic", help="the generated WSOL benchmark (wsol_core.data.synthetic)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=300)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--unlabeled", action="store_true", help="labels -1 (co-localization)")
    p.add_argument(
        "--upright", action="store_true", help="creatures in a canonical pose (see wsol_core/data/synthetic.py)"
    )
    p.add_argument(
        "--body-texture",
        action="store_true",
        help="every body wears the same checker texture (see wsol_core/data/synthetic.py)",
    )
    _add_writer_options(p, default_bytes="0", default_samples=1000)

    p = sub.add_parser("index", help="rebuild the DALI index files of a split directory")
    p.add_argument("split_dir")

    p = sub.add_parser("verify", help="check a split directory as the loaders do")
    p.add_argument("split_dir")
    p.add_argument("--full", action="store_true", help="also check every tar's SHA-256")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "index":
        from wsol_core.data.writer import rebuild_indexes

        for idx in rebuild_indexes(args.split_dir):
            print(idx)
        return 0
    if args.command == "verify":
        from wsol_core.data.manifest import verify_split

        split = verify_split(args.split_dir, mode="full" if args.full else "fast")
        print(f"{args.split_dir}: OK, {split.num_samples} samples in {len(split.shards)} shards")
        return 0

    options = _writer_options(args)
    if args.command == "wsolmeta":
        from wsol_core.data.converters import convert_wsolmeta

        names = Path(args.class_names).read_text().splitlines() if args.class_names else ()
        results = convert_wsolmeta(
            args.images,
            args.metadata,
            args.out,
            splits=args.splits,
            dataset=args.dataset,
            masks_root=args.masks,
            split_images=_split_roots(args.split_images),
            num_classes=args.num_classes,
            class_names=[n for n in names if n.strip()],
            options=options,
        )
    elif args.command == "cub":
        from wsol_core.data.converters import convert_cub

        results = convert_cub(args.root, args.out, options=options)
    elif args.command == "imagenet":
        from wsol_core.data.converters import convert_imagenet

        if not args.train and not args.val:
            parser.error("imagenet needs --train and/or --val")
        results = convert_imagenet(
            args.train, args.val, args.boxes, args.out, synset_words=args.synset_words, options=options
        )
    else:
        from wsol_core.data.synthetic import SyntheticConfig, write_synthetic

        config = SyntheticConfig(
            size=args.size,
            num_classes=args.classes,
            unlabeled=args.unlabeled,
            upright=args.upright,
            body_texture=args.body_texture,
        )
        results = write_synthetic(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            config=config,
            seed=args.seed,
            options=options,
        )
    _report(results)
    return 0
