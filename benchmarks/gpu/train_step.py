"""Tier 1 of the GPU check: every method's training step on the protocol's backbones.

    python benchmarks/gpu/train_step.py --device cuda --backbones resnet50,vgg16,inception_v3 --batches 64,128
    python benchmarks/gpu/train_step.py --device cpu --backbones tiny --batches 4 --image-size 64 --steps 2   # dry run

One step is what training does: forward (both branches of the dual-branch methods), the
method's losses, backward, and the fused SGD step of ``wsol_core.train.optim`` (foreach on a
CPU), in bf16 autocast with channels_last memory on CUDA. Per (mode, backbone, batch, method):

- images/s over ``--steps`` steps timed as one block (one synchronization at each end, none
  inside, as in training), after ``--warmup`` steps (the compile, for ``compiled``);
- peak memory (``torch.cuda.max_memory_allocated``) over the timed steps;
- host synchronizations per step, counted by ``torch.cuda.set_sync_debug_mode("warn")`` over 3
  more steps (every ``.item()``, ``.cpu()`` or data-dependent shape that stalls the GPU);
- the ratio of its step time to CAM's on the same backbone and batch.

``--modes eager,compiled``: compiled wraps the method in ``torch.compile`` (the losses stay
eager, as in the job with ``train.compile=true``). Configurations run eager first, in the order
given; each is skipped once ``--deadline`` (a Unix time) is near, and the JSON is rewritten after
each one, so a run stopped at its budget still leaves every finished figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._common import machine_info  # noqa: E402
from wsol_core.config import load_config  # noqa: E402
from wsol_core.data.batch import Batch  # noqa: E402
from wsol_core.methods import METHOD_NAMES, build_method  # noqa: E402
from wsol_core.train.optim import build_optimizer  # noqa: E402

#: Published training throughputs to read ours against (ResNet50, mixed precision, per GPU).
ANCHORS = {
    "nvidia_dle_resnet50_amp_a100_img_s": {
        "value": 2470,
        "source": "NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 training performance, A100 80GB, AMP",
    },
    "mlperf_resnet50_h200_img_s": {
        "value": 7940,
        "source": "MLPerf Training ResNet-50 results, about 7,940 img/s per H200 (closed division, heavily tuned, DALI + MXNet)",
    },
    "note": "the protocol's ResNet50 keeps layer4 at stride 1 (14x14 maps at 224 px), about 1.3x the "
    "standard network's FLOPs, and adds the method's head and losses: expect a lower rate",
}


def _batch(batch_size: int, size: int, num_classes: int, device: torch.device, channels_last: bool) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    boxes = torch.tensor([[size * 0.2, size * 0.2, size * 0.8, size * 0.8]]).repeat(batch_size, 1, 1).to(device)
    sizes = torch.full((batch_size, 2), size, dtype=torch.int64, device=device)
    return Batch(
        images,
        labels,
        [f"b{i}" for i in range(batch_size)],
        sizes,
        boxes,
        torch.ones(batch_size, dtype=torch.int64, device=device),
        # The box regressor learns from pseudo boxes through each crop's window (the whole image here).
        views=torch.tensor([[0.0, 0.0, float(size), float(size), 0.0]], device=device).repeat(batch_size, 1),
        pseudo_boxes=boxes[:, 0].clone(),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, backbone: str, batch_size: int, mode: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"method.name={name}", f"model.backbone={backbone}"])
    method = build_method(cfg, args.num_classes).to(device)
    cuda = device.type == "cuda"
    if cuda:
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, cfg.optim, device)
    model = torch.compile(method) if mode == "compiled" else method
    batch = _batch(batch_size, args.image_size, args.num_classes, device, cuda)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else nullcontext()

    def step() -> None:
        with amp:
            loss = sum(method.losses(model(batch.images, batch.labels, progress=0.5), batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {
        "step_ms": 1000 * elapsed / args.steps,
        "images_per_s": args.steps * batch_size / elapsed,
        "warmup_s": round(warmup_s, 2),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "optimizer": "fused" if optimizer.defaults.get("fused") else "foreach",
    }
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    step()
                _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        result["host_syncs_per_step"] = len(syncs) / 3
        result["sync_examples"] = sorted(set(s.splitlines()[0][:160] for s in syncs))[:5]
    else:
        result["host_syncs_per_step"] = None  # counted by CUDA's sync debug mode only
    method = model = optimizer = batch = None  # release the device memory before the next configuration
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", default="resnet50,vgg16,inception_v3")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--compiled-methods", default="", help="methods to compile (default: all of --methods)")
    parser.add_argument("--compiled-backbones", default="", help="backbones to compile (default: all of --backbones)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=0.0, help="Unix time after which no configuration starts")
    parser.add_argument("--reserve", type=float, default=20.0, help="seconds before the deadline to stop starting work")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    methods = [m for m in args.methods.split(",") if m]
    methods = ["cam"] + [m for m in methods if m != "cam"]  # the baseline first: every ratio needs it
    backbones = [b for b in args.backbones.split(",") if b]
    payload: dict = {
        "benchmark": "gpu_train_step",
        "machine": machine_info(args.device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "anchors": ANCHORS,
        "rows": [],
        "skipped": [],
    }
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")

    for mode in args.modes.split(","):
        for backbone in backbones:
            if mode == "compiled" and args.compiled_backbones and backbone not in args.compiled_backbones.split(","):
                continue
            for batch_size in (int(b) for b in args.batches.split(",")):
                cam_ms = None
                for name in methods:
                    if (
                        mode == "compiled"
                        and args.compiled_methods
                        and name not in args.compiled_methods.split(",") + ["cam"]
                    ):
                        continue
                    row = {"mode": mode, "backbone": backbone, "batch": batch_size, "method": name}
                    if args.deadline and time.time() > args.deadline - args.reserve:
                        payload["skipped"].append(row | {"why": "time budget"})
                        save()
                        continue
                    try:
                        row |= measure(name, backbone, batch_size, mode, args, device)
                    except torch.cuda.OutOfMemoryError as exc:
                        row |= {"error": f"out of memory: {str(exc).splitlines()[0]}"}
                        torch.cuda.empty_cache()
                    except Exception as exc:  # one failing configuration must not hide the others
                        row |= {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                    if name == "cam" and "step_ms" in row:
                        cam_ms = row["step_ms"]
                    if cam_ms and "step_ms" in row:
                        row["ratio_to_cam"] = row["step_ms"] / cam_ms
                    payload["rows"].append(row)
                    save()
                    shown = f"{row['images_per_s']:8.0f} img/s" if "images_per_s" in row else row.get("error", "")
                    print(f"{mode:>8} {backbone:>12} b{batch_size:<4} {name:>5}: {shown}", flush=True)
    best = [r for r in payload["rows"] if r["backbone"] == "resnet50" and r["method"] == "cam" and "images_per_s" in r]
    if best:
        top = max(r["images_per_s"] for r in best)
        payload["resnet50_cam_best_img_s"] = top
        payload["resnet50_cam_over_anchor"] = {k: top / v["value"] for k, v in ANCHORS.items() if isinstance(v, dict)}
    save()
    return payload


if __name__ == "__main__":
    main()
