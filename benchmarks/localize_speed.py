"""Throughput of ``jobs/localize.py`` on a folder of pictures.

    uv run python benchmarks/localize_speed.py [--num-images 1000 --backbones tiny,resnet50 --device cpu]

Writes ``--num-images`` JPEGs of random sizes (200-500 px a side, textured background, one
coloured object) into a temporary folder, saves a checkpoint per backbone (random weights: speed
does not depend on them; the val threshold 0.2 stored with it), then runs the job's ``main`` as
users run it, once with overlays (the default) and once with ``--no-overlays``. Recorded per run:
the command's wall-clock images/s (model load included) and the job's own loop images/s.
Writes ``benchmarks/results/localize_speed.json`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, random_checkpoint, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_pictures(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (int(v) for v in rng.integers(200, 500, 2))
        img = rng.integers(50, 150, size=(h, w, 3), dtype=np.uint8)
        bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y0 : y0 + bh, x0 : x0 + bw] = rng.integers(0, 256, 3)
        (root / f"{i // 100:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"{i // 100:02d}" / f"p{i:05d}.jpg", quality=90)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--backbones", default="tiny,resnet50")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    spec = importlib.util.spec_from_file_location("localize_job", REPO / "jobs" / "localize.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # type: ignore[union-attr]

    runs = []
    with tempfile.TemporaryDirectory(prefix="wsol-localize-bench-") as tmp:
        tmp = Path(tmp)
        write_pictures(tmp / "pictures", args.num_images)
        for backbone in args.backbones.split(","):
            ckpt = random_checkpoint(
                tmp / f"ckpt_{backbone}", ["method.name=cam", f"model.backbone={backbone}"], 200, 0.2
            )
            for overlays in (True, False):
                out = tmp / f"out_{backbone}_{overlays}"
                argv_job = [
                    "--checkpoint",
                    str(ckpt),
                    "--images",
                    str(tmp / "pictures"),
                    "--out",
                    str(out),
                    "--batch-size",
                    str(args.batch_size),
                    "--num-threads",
                    str(args.num_threads),
                ]
                argv_job += ["--use-gpu"] if args.device == "cuda" else []
                argv_job += [] if overlays else ["--no-overlays"]
                start = time.perf_counter()
                with redirect_stdout(io.StringIO()):
                    code = job.main(argv_job)
                wall = time.perf_counter() - start
                summary = json.loads((out / "summary.json").read_text())
                assert code == 0 and summary["localized"] == args.num_images, summary
                row = {
                    "backbone": backbone,
                    "overlays": overlays,
                    "images": args.num_images,
                    "command_seconds": wall,
                    "command_images_per_s": args.num_images / wall,
                    "loop_images_per_s": summary["images_per_s"],
                }
                runs.append(row)
                print(
                    f"localize {backbone} overlays={overlays}: {row['command_images_per_s']:.1f} img/s (command), "
                    f"{row['loop_images_per_s']:.1f} img/s (loop)",
                    flush=True,
                )
    payload = {
        **payload_header("localize_speed", argv, args.device),
        "runs": runs,
        "batch_size": args.batch_size,
        "decode_threads": args.num_threads,
        "torch_threads": torch.get_num_threads(),
    }
    path = write_result("localize_speed", payload, args.out)
    print(f"-> {path}")
    return payload


if __name__ == "__main__":
    main()
