"""What the strict JPEG check costs: a PIL decode (what the torch workers did before), the
strict libjpeg-turbo decode that replaces it there, and the extra strict pass DALI's feeder makes,
per ImageNet-sized image (500x375, quality 90, the 4:2:0 of most camera JPEGs).

    uv run python benchmarks/jpeg_check.py [--repeat 300]   # -> benchmarks/results/jpeg_check.json
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.data.format import decode_jpeg_strict, encoded_image_problem  # noqa: E402


def natural_image(width: int, height: int, seed: int) -> bytes:
    """A photograph-like JPEG: smooth gradients, a few shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / (37 + 11 * c) + y / (53 - 7 * c) + c) for c in range(3)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += rng.uniform(-80, 80, size=3)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def per_call_ms(fn, data: list[bytes], repeat: int) -> float:
    for d in data:
        fn(d)
    start = time.perf_counter()
    for i in range(repeat):
        fn(data[i % len(data)])
    return (time.perf_counter() - start) / repeat * 1e3


def pil_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img.convert("RGB")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    images = [natural_image(500, 375, seed) for seed in range(8)]
    load_before = os.getloadavg()[0]
    timings = {
        "pil_decode_ms": per_call_ms(pil_decode, images, args.repeat),
        "strict_decode_ms": per_call_ms(decode_jpeg_strict, images, args.repeat),
        "structure_check_ms": per_call_ms(lambda d: encoded_image_problem(d, "jpg"), images, args.repeat),
        "strict_check_ms": per_call_ms(lambda d: encoded_image_problem(d, "jpg", entropy=True), images, args.repeat),
    }
    result = {
        **payload_header("jpeg_check", argv),
        "images": {"count": len(images), "size": [500, 375], "mean_bytes": int(np.mean([len(d) for d in images]))},
        "repeat": args.repeat,
        **{k: round(v, 4) for k, v in timings.items()},
        # The torch workers: a strict decode instead of PIL's. DALI's feeder: a strict pass on top.
        "torch_workers_cost_ratio": round(timings["strict_decode_ms"] / timings["pil_decode_ms"], 3),
        "dali_feeder_extra_ms": round(timings["strict_check_ms"] - timings["structure_check_ms"], 4),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    path = write_result("jpeg_check", result, args.out)
    print(result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
