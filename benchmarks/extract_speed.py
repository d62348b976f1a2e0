"""Throughput of pseudo-box extraction (``jobs/extract_boxes.py``) over a shard split.

    uv run python benchmarks/extract_speed.py [--num-images 512 --size 256 --backbones tiny,resnet50 --num-workers 0]

Writes a synthetic split of ``--num-images`` pictures (``--size`` px) with ``jobs/make_shards.py``,
saves a C2AM checkpoint per backbone (maps read at the protocol's 224 x 224; random weights: speed does not depend on them; the val
threshold 0.3 stored with it), and runs the command's ``main`` as users run it: in this process
(``--num-workers 0``) or on Ray Train workers. Recorded per backbone: the extraction loop's
images/s (what the command prints and ``summary.json`` keeps) and the wall-clock images/s of the
whole command (model load, header, summary, and Ray's start with workers). With ``--device cuda``
the command runs with ``--use-gpu``. Writes ``benchmarks/results/extract_speed_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, random_checkpoint, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", default="tiny,resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    from wsol_core.commands import extract_boxes

    results = {}
    with tempfile.TemporaryDirectory(prefix="extract-speed-") as tmp:
        root = Path(tmp) / "shards"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "jobs" / "make_shards.py"),
                "synthetic",
                "--out",
                str(root),
                "--num-train",
                str(args.num_images),
                "--num-val",
                "8",
                "--num-test",
                "8",
                "--size",
                str(args.size),
            ],
            check=True,
            capture_output=True,
        )
        num_classes = json.loads((root / "train" / "dataset.json").read_text())["num_classes"]
        for backbone in args.backbones.split(","):
            # With data.root set the evaluation input is the protocol's 224 x 224, as on real data.
            overrides = ["method.name=c2am", f"model.backbone={backbone}", f"data.root={root}"]
            ckpt = random_checkpoint(Path(tmp) / f"ckpt-{backbone}", overrides, num_classes, 0.3)
            out = Path(tmp) / f"boxes-{backbone}"
            command = ["--checkpoint", str(ckpt), "--data", str(root), "--out", str(out)]
            command += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
            command += ["--use-gpu"] if args.device == "cuda" else []
            start = time.perf_counter()
            code = extract_boxes.main(command)
            wall = time.perf_counter() - start
            assert code == 0, f"extraction with {backbone} failed"
            summary = json.loads((out / "summary.json").read_text())
            assert summary["extracted"] == args.num_images, summary
            results[backbone] = {
                "loop_images_per_s": summary["images_per_s"],
                "command_images_per_s": args.num_images / wall,
                "command_seconds": wall,
            }
            print(backbone, json.dumps(results[backbone]), flush=True)
    payload = {
        **payload_header("extract_speed", argv, args.device),
        "settings": vars(args),
        "results": results,
    }
    path = write_result(f"extract_speed_{args.device}", payload, args.out or None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
