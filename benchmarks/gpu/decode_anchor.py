"""Tier 1 of the GPU check: batched JPEG decoding on the GPU without DALI, the decode anchor.

    python benchmarks/gpu/decode_anchor.py --device cuda                          # 256 pictures, batches of 128
    python benchmarks/gpu/decode_anchor.py --device cpu --unique 8 --batch 4 --rounds 2   # dry run

ImageNet-like JPEGs (about 500 x 375 px, 110 KB at quality 90: ``benchmarks/input_pipeline.py``'s
pictures) decoded with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG's batched decode
on CUDA), then, as the torch loader's ``data.decode=device`` path does, each resized to 256 and
cropped to 224 on the device. Reports images/s for the decode alone and for decode + resize +
crop, each over ``--rounds`` passes after one untimed pass, and the host's single-thread CPU
decode of the same files for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._common import machine_info  # noqa: E402
from benchmarks.input_pipeline import encode, imagenet_like, tune_detail  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--unique", type=int, default=256, help="distinct pictures")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8, help="timed passes over the pictures")
    parser.add_argument("--target-kb", type=int, default=110)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision >= 0.29: see torch_loader
    device = torch.device(args.device)
    start = time.perf_counter()
    detail = tune_detail(args.target_kb * 1000)
    files = [encode(imagenet_like(np.random.default_rng([2, i]), detail)) for i in range(args.unique)]
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in files]
    prepare_s = time.perf_counter() - start
    batches = [data[i : i + args.batch] for i in range(0, len(data), args.batch)]

    def decode_only() -> None:
        for b in batches:
            decode_jpeg(b, mode=ImageReadMode.RGB, device=device)

    def decode_resize_crop() -> None:
        for b in batches:
            out = decode_jpeg(b, mode=ImageReadMode.RGB, device=device)
            crops = []
            for img in out:
                x = torch.nn.functional.interpolate(img[None].float(), size=(256, 256), mode="bilinear", antialias=True)
                crops.append(x[0, :, 16:240, 16:240])
            torch.stack(crops)

    results: dict = {}
    for name, fn in (("decode", decode_only), ("decode_resize_crop", decode_resize_crop)):
        fn()  # untimed: nvJPEG handles, allocator
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            fn()
        _sync(device)
        results[f"{name}_images_per_s"] = args.rounds * len(data) / (time.perf_counter() - t0)
    torch.set_num_threads(1)
    sample = data[: min(len(data), 32)]
    t0 = time.perf_counter()
    for d in sample:
        decode_jpeg(d, mode=ImageReadMode.RGB)
    results["cpu_one_thread_decode_images_per_s"] = len(sample) / (time.perf_counter() - t0)
    payload = {
        "benchmark": "gpu_decode_anchor",
        "machine": machine_info(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "pictures": {
            "count": len(files),
            "size": [500, 375],
            "mean_kb": round(float(np.mean([len(b) for b in files])) / 1000, 1),
            "prepare_s": round(prepare_s, 1),
        },
        **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(
        f"decode on {device}: {results['decode_images_per_s']:.0f} img/s, with resize + crop "
        f"{results['decode_resize_crop_images_per_s']:.0f} img/s; CPU 1 thread {results['cpu_one_thread_decode_images_per_s']:.0f} img/s"
    )
    return payload


if __name__ == "__main__":
    main()
