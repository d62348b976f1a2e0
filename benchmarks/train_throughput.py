"""Training throughput through the full input pipeline against the model on in-memory tensors.

    uv run python benchmarks/train_throughput.py                        # CPU: tiny backbone, CAM and FMCG
    uv run python benchmarks/train_throughput.py --device cuda --backbone resnet50,vgg16 \\
        --synthetic-size 256 --num-train 8192 --batch-size 128            # GPU: bf16 + channels_last

Runs the training job's own epoch (``wsol_core.train.loop.train_one_epoch``: forward, losses,
backward, SGD step, per-step loss sync) in one process, three ways per (backbone, method):

- ``pipeline``: batches from the job's loader (DALI: CPU mode here, ``mixed`` nvJPEG decode on a
  GPU) over the synthetic benchmark's shards, as the job reads them;
- ``torch_loader``: the same with the torch/webdataset fallback loader (the loader anchor);
- ``in_memory``: the same number of steps over batches decoded once and held on the device (the
  model-only anchor: no decode, no augmentation, no host-to-device copy).

Each is timed over its second epoch (the first warms up the pipeline, the allocator and the
kernels). Reported: images/s, the data-wait fraction (time blocked on the next batch), and
pipeline / in-memory. Writes ``benchmarks/results/train_throughput[_<device>].json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.config import Config, load_config  # noqa: E402
from wsol_core.data.loader import build_loader  # noqa: E402
from wsol_core.data.manifest import load_manifest  # noqa: E402
from wsol_core.data.resolve import resolve_data_root  # noqa: E402
from wsol_core.methods import build_method  # noqa: E402
from wsol_core.train.loop import loader_options, seed_everything, train_one_epoch  # noqa: E402
from wsol_core.train.optim import build_optimizer, build_scheduler  # noqa: E402


class InMemory:
    """A loader over batches already on the device, with the real loader's length and interface."""

    def __init__(self, batches: list, steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))

    def set_epoch(self, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


def measure(cfg: Config, root: Path, device: torch.device, mode: str, epochs: int = 2) -> dict:
    seed_everything(cfg.train.seed, 0)
    num_classes = load_manifest(root / "train").num_classes
    method = build_method(cfg, num_classes).to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    options = loader_options(cfg)
    backend = "torch" if mode == "torch_loader" else cfg.data.loader
    loader = build_loader(root / "train", split_kind="train", device=device, options=options, backend=backend)
    steps = len(loader)
    if mode == "in_memory":
        loader.set_epoch(0)
        held = []
        for batch in loader:  # a few distinct batches, cycled: the model's cost does not depend on which
            held.append(batch.to(device))
            if len(held) == 16:
                break
        loader.close()
        loader = InMemory(held, steps)
    optimizer = build_optimizer(method, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps, cfg.train.epochs)
    metrics = {}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        metrics = train_one_epoch(
            method, method, loader, optimizer, scheduler, cfg, device, epoch, steps, show_progress=False
        )
    loader.close()
    return {
        "images_per_s": metrics["train/images_per_s"],
        "data_wait": metrics["train/data_wait"],
        "steps": steps,
        "backend": getattr(loader, "backend", "in_memory"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="tiny", help="comma-separated")
    parser.add_argument("--method", default="cam,fmcg", help="comma-separated")
    parser.add_argument("--synthetic-size", type=int, default=128, help="image side; crops are 7/8 of it")
    parser.add_argument("--num-train", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="DALI threads / torch workers (default: all cores)")
    parser.add_argument("--skip-torch-loader", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or os.cpu_count() or 1
    rows = []
    for backbone in args.backbone.split(","):
        for method in args.method.split(","):
            cfg = load_config(
                overrides=[
                    f"method.name={method}",
                    f"model.backbone={backbone}",
                    f"data.batch_size={args.batch_size}",
                    f"data.synthetic.size={args.synthetic_size}",
                    f"data.synthetic.num_train={args.num_train}",
                    f"data.num_threads={threads}",
                    f"train.channels_last={'true' if device.type == 'cuda' else 'false'}",
                    *args.overrides,
                ]
            )
            root = resolve_data_root(cfg.data)
            row = {
                "backbone": backbone,
                "method": method,
                "amp": cfg.train.amp,
                "channels_last": cfg.train.channels_last,
                "torch_loader_decode": cfg.data.decode,
            }
            for mode in ("in_memory", "pipeline", *(() if args.skip_torch_loader else ("torch_loader",))):
                start = time.perf_counter()
                row[mode] = measure(cfg, root, device, mode)
                print(
                    f"{backbone:>9} {method:>5} {mode:>12}: {row[mode]['images_per_s']:8.1f} img/s, "
                    f"data wait {row[mode]['data_wait']:.1%} ({row[mode]['backend']}, {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            row["pipeline_over_in_memory"] = row["pipeline"]["images_per_s"] / row["in_memory"]["images_per_s"]
            if "torch_loader" in row:
                row["pipeline_over_torch_loader"] = (
                    row["pipeline"]["images_per_s"] / row["torch_loader"]["images_per_s"]
                )
            rows.append(row)
    payload = {
        **payload_header("train_throughput", argv, args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"threads": threads},
        "rows": rows,
    }
    name = "train_throughput" if device.type == "cpu" else f"train_throughput_{device.type}"
    path = write_result(name, payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
