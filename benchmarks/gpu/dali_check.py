"""Tier 2 of the GPU check: what the DALI loader feeds the model, against the exact CPU path.

    python benchmarks/gpu/dali_check.py --device cuda                    # DALI mixed (nvJPEG) decode
    python benchmarks/gpu/dali_check.py --device cpu --num-val 16 --size 64 --backbone tiny   # dry run

On the synthetic benchmark's val split, one model (fixed seed) sees the same images through
three input paths: the torch loader with PIL in its workers (``eval.loader=exact``, the
protocol's pixels), DALI (``mixed`` decode on a GPU, CPU mode elsewhere) and the torch loader's
``data.decode=device`` (batched nvJPEG). Reported for each path against the exact one: the
largest and mean pixel difference (normalized units), the largest and mean difference of the
localization maps (each normalized to [0, 1] per image), and MaxBoxAccV2 / GT-known Loc from
each, with the difference in points.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks._common import machine_info  # noqa: E402
from wsol_core.config import load_config  # noqa: E402
from wsol_core.data.loader import build_loader  # noqa: E402
from wsol_core.data.manifest import load_manifest  # noqa: E402
from wsol_core.data.resolve import resolve_data_root  # noqa: E402
from wsol_core.methods import build_method  # noqa: E402
from wsol_core.train.evaluate import evaluate_split  # noqa: E402
from wsol_core.train.loop import loader_options  # noqa: E402

PATHS = {  # name -> loader overrides
    "exact": {"backend": "torch", "decode": "workers"},
    "dali": {"backend": "dali"},
    "torch_device_decode": {"backend": "torch", "decode": "device"},
}


def _normalize(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1).float()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--method", default="cam")
    parser.add_argument("--size", type=int, default=256, help="synthetic image side (crop: 7/8)")
    parser.add_argument("--num-val", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(
        overrides=[
            f"method.name={args.method}",
            f"model.backbone={args.backbone}",
            f"data.synthetic.size={args.size}",
            f"data.synthetic.num_val={args.num_val}",
            f"data.synthetic.num_train={args.batch}",
            "data.synthetic.num_test=1",
            f"data.num_threads={args.threads}",
            f"eval.batch_size={args.batch}",
        ]
    )
    start = time.perf_counter()
    root = resolve_data_root(cfg.data)
    prepare_s = time.perf_counter() - start
    torch.manual_seed(0)
    method = build_method(cfg, load_manifest(root / "val").num_classes).to(device).eval()
    runs: dict = {}
    for name, overrides in PATHS.items():
        try:
            loader = build_loader(
                root / "val",
                split_kind="eval",
                device=device,
                options=loader_options(cfg),
                batch_size=args.batch,
                **overrides,
            )
            images, maps = {}, {}
            t0 = time.perf_counter()
            for batch in loader:
                m = _normalize(method.localization_maps(batch.images, batch.labels))
                for i, key in enumerate(batch.keys):
                    if not batch.is_padding[i]:
                        images[key], maps[key] = batch.images[i].float().cpu(), m[i].cpu()
            seconds = time.perf_counter() - t0
            outcome = evaluate_split(
                method,
                build_loader(
                    root / "val",
                    split_kind="eval",
                    device=device,
                    options=loader_options(cfg),
                    batch_size=args.batch,
                    **overrides,
                ),
                cfg.eval,
                split="val",
            )
            runs[name] = {
                "backend": loader.backend,
                "reason": getattr(loader, "backend_reason", ""),
                "images": images,
                "maps": maps,
                "seconds": seconds,
                "metrics": {k: outcome.metrics[f"val/{k}"] for k in ("maxboxacc_v2", "gt_known_loc")},
            }
            loader.close()
        except Exception as exc:  # DALI missing or failing: the other paths still report
            runs[name] = {"error": f"{type(exc).__name__}: {exc}"}
    exact = runs["exact"]
    report: dict = {}
    for name, run in runs.items():
        if "error" in run:
            report[name] = {"error": run["error"]}
            continue
        keys = sorted(exact["images"])
        pix = torch.stack([(run["images"][k] - exact["images"][k]).abs() for k in keys])
        mp = torch.stack([(run["maps"][k] - exact["maps"][k]).abs() for k in keys])
        report[name] = {
            "backend": run["backend"],
            "why": run["reason"],
            "images": len(keys),
            "images_per_s_with_model": round(len(keys) / run["seconds"], 1),
            "pixel_max_diff": float(pix.max()),
            "pixel_mean_diff": float(pix.mean()),
            "map_max_diff": float(mp.max()),
            "map_mean_diff": float(mp.mean()),
            **run["metrics"],
            "maxboxacc_v2_diff_points": run["metrics"]["maxboxacc_v2"] - exact["metrics"]["maxboxacc_v2"],
        }
        print(
            f"{name:>20}: pixels max {report[name]['pixel_max_diff']:.3f} mean {report[name]['pixel_mean_diff']:.4f}; "
            f"maps max {report[name]['map_max_diff']:.3f} mean {report[name]['map_mean_diff']:.4f}; "
            f"MaxBoxAccV2 {run['metrics']['maxboxacc_v2']:.2f}",
            flush=True,
        )
    payload = {
        "benchmark": "gpu_dali_check",
        "machine": machine_info(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "prepare_s": round(prepare_s, 1),
        "paths": report,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    main()
