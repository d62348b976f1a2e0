"""Training-step cost of each method against the CAM baseline on the same backbone and batch.

    uv run python benchmarks/step_cost.py [--backbone tiny --image-size 112 --batch-size 16]

Times forward + losses + backward + SGD step (median of ``--steps`` after ``--warmup``), with
bf16 autocast and channels_last on CUDA, writes ``benchmarks/results/step_cost[_<backbone>].json``
and prints one line per method with its ratio to CAM. Target (issue 2): every dual-branch
method under 1.6x the baseline step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.config import load_config  # noqa: E402
from wsol_core.data.batch import Batch  # noqa: E402
from wsol_core.methods import METHOD_NAMES, build_method  # noqa: E402


def time_method(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"method.name={name}", f"model.backbone={args.backbone}"])
    method = build_method(cfg, args.num_classes).to(device)
    channels_last = device.type == "cuda" or args.channels_last
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    batch = Batch(
        images,
        labels,
        [""] * args.batch_size,
        torch.zeros(args.batch_size, 2),
        torch.zeros(args.batch_size, 1, 4),
        torch.zeros(args.batch_size),
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if (device.type == "cuda" or args.bf16) else nullcontext()
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with amp:
            loss = sum(method.losses(method(images, labels, progress=0.5), batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(METHOD_NAMES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too")
    parser.add_argument("--channels-last", action="store_true", help="channels_last on CPU too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    results = {name: time_method(name, args, device) for name in dict.fromkeys(["cam", *args.methods])}
    baseline = results["cam"]["median_s"]
    for result in results.values():
        result["ratio_to_cam"] = result["median_s"] / baseline
    payload = {
        **payload_header("step_cost", None, args.device),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "amp_bf16": device.type == "cuda" or args.bf16,
        "target_ratio": 1.6,
        "methods": results,
    }
    suffix = "" if args.backbone == "tiny" else f"_{args.backbone}"
    path = write_result(f"step_cost{suffix}_{device.type}", payload, args.out)
    summary = ", ".join(f"{n} {r['median_s'] * 1000:.0f} ms ({r['ratio_to_cam']:.2f}x)" for n, r in results.items())
    print(f"step_cost {args.backbone} {args.image_size}px b{args.batch_size} on {device.type}: {summary} -> {path}")


if __name__ == "__main__":
    main()
