"""What a pretrained trunk costs on this machine: the budget issue 16 asks for before the choice.

    uv run python benchmarks/trunk_budget.py [--image-size 112 --batch-size 32 --threads 2]

Times one SGD training step (forward, cross-entropy over 120 classes, backward, step; median of
``--steps`` after two warm-up steps) of each candidate trunk under a GAP classifier, as the
pretraining task trains it and as a fine-tuning run trains it:

- ``tiny``: the project's small VGG-style backbone (stride 8: a 14 x 14 map at 112 px);
- ``resnet18``: torchvision's ResNet18 with ``layer4`` at stride 1, the protocol's change to
  ResNet50 (stride 16: a 7 x 7 map at 112 px);
- ``resnet18-large``: the same with ``layer3`` at stride 1 too (stride 8: 14 x 14, the tiny
  net's map and the protocol's 14 x 14 at 224 px).

Writes ``benchmarks/results/trunk_budget.json`` with img/s, parameters, map size and the hours
that the issue-16 plan (pretraining, then 8 variants x 3 seeds x 2 forms of fine-tuning) would
take at that rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.models import TinyCNN  # noqa: E402

# Images a plan trains on: pretraining 120 classes x 150 images x 8 epochs, then 48 fine-tuning
# runs (8 variants x 3 seeds x 2 forms) of 1200 images x 3 epochs, as wsol-pretrain-trunk's and
# benchmarks/ablation.py's defaults set them.
PRETRAIN_IMAGES = 120 * 150 * 8
FINETUNE_IMAGES = 48 * 1200 * 3


def resnet18_trunk(large_feature_map: bool) -> nn.Module:
    from torchvision.models import resnet18

    from wsol_core.models.resnet import set_stride_one

    net = resnet18(weights=None)
    for layer in [net.layer4, net.layer3] if large_feature_map else [net.layer4]:
        set_stride_one(layer)  # the protocol's change, as the ResNet50 backbone makes it
    return nn.Sequential(*list(net.children())[:-2])


def candidates() -> dict[str, tuple[nn.Module, int]]:
    return {
        "tiny": (TinyCNN(), 256),
        "resnet18": (resnet18_trunk(False), 512),
        "resnet18-large": (resnet18_trunk(True), 512),
    }


def time_trunk(trunk: nn.Module, channels: int, args) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 120))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 120, (args.batch_size,))
    with torch.no_grad():
        map_side = trunk(images[:1]).shape[-1]
    times = []
    for step in range(args.steps + 2):
        began = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - began)
    images_per_s = args.batch_size / statistics.median(times)
    return {
        "images_per_s": round(images_per_s, 1),
        "params_m": round(sum(p.numel() for p in trunk.parameters()) / 1e6, 2),
        "map": f"{map_side}x{map_side}",
        "plan_hours": round((PRETRAIN_IMAGES + FINETUNE_IMAGES) / images_per_s / 3600, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for name, (trunk, channels) in candidates().items():
        rows[name] = time_trunk(trunk, channels, args)
        print(f"{name:>15}: {rows[name]}", flush=True)
    payload = {
        **payload_header("trunk_budget", argv, "cpu"),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "plan_images": {"pretrain": PRETRAIN_IMAGES, "finetune": FINETUNE_IMAGES},
        "rows": rows,
    }
    path = write_result("trunk_budget", payload, args.out or None)
    print(f"[wsol] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
