"""Every benchmark with one command; each writes its own JSON under benchmarks/results/.

    uv run python benchmarks/run_all.py                          # CPU: everything, ablation last (about 1.5 h on 2 cores)
    uv run python benchmarks/run_all.py --skip ablation          # the performance figures only (about 15 min)
    uv run python benchmarks/run_all.py --device cuda            # the GPU figures of the issues (one GPU)
    uv run python benchmarks/run_all.py --only eval_speed,step_cost

Each benchmark runs as its own process (DALI threads, Ray instances and CUDA contexts do not
leak from one into the next), one after the other so that none is timed beside another. The
settings per device are below; a benchmark's own options are in its docstring. A failed benchmark
is reported and the others still run; the exit status is 1 if any failed. ``results/index_<device>.json``
lists what ran, with each one's exit status, wall time and JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name -> (script, arguments, the JSON it writes) per device
PLANS: dict[str, dict[str, tuple[str, list[str], str]]] = {
    "cpu": {
        "eval_speed": ("eval_speed.py", ["--device", "cpu"], "eval_speed.json"),
        "input_pipeline": ("input_pipeline.py", [], "input_pipeline.json"),
        "step_cost": (
            "step_cost.py",
            ["--device", "cpu", "--batch-size", "32", "--steps", "5", "--warmup", "2"],
            "step_cost_cpu.json",
        ),
        "train_throughput": ("train_throughput.py", [], "train_throughput.json"),
        "train_scaling": ("train_scaling.py", [], "train_scaling.json"),
        # The searched FMCG config (tune/search_srd.py on this benchmark) rides along as a variant.
        "ablation": (
            "ablation.py",
            ["--variant", "fmcg-searched=@" + str(RESULTS / "search_synthetic_best_config.yaml")],
            "ablation.json",
        ),
        "inference_maps": ("inference_maps.py", [], "inference_maps_fmcg_val.json"),  # on the ablation's FMCG models
        "pnl_attention": (  # where PNL's attention goes, on the same FMCG models
            "pnl_attention.py",
            ["--ablation", str(RESULTS / "ablation.json"), "--name", "ablation"],
            "pnl_attention_ablation.json",
        ),
        "localize_speed": ("localize_speed.py", [], "localize_speed.json"),
        "jpeg_check": ("jpeg_check.py", [], "jpeg_check.json"),
        "ray_start_load": ("ray_start_load.py", [], "ray_start_load.json"),
        "extract_speed": ("extract_speed.py", [], "extract_speed_cpu.json"),
        "two_stage": ("two_stage.py", [], "two_stage_grid.json"),  # C2AM -> pseudo boxes -> regressor, 3 seeds
        "trunk_budget": ("trunk_budget.py", [], "trunk_budget.json"),  # issue 16: which trunk the CPU affords
        "start_cost": (
            "start_cost.py",
            [],
            "start_cost.json",
        ),  # issue 18: imports and one job, with and without bytecode
        # issue 18: the whole test suite, CPU seconds per test file and test (about 25 min)
        "suite_cpu": ("suite_cpu.py", [], "suite_cpu.json"),
        # issue 18: Ray Train's cleaners left polling on a head without a dashboard, and stopped
        "leftover_cleaners": ("leftover_cleaners.py", [], "leftover_cleaners.json"),
    },
    "cuda": {
        # The issues' GPU targets: 50,000 maps at 1000 thresholds; DALI mixed decode; training
        # images/s with data wait for ResNet50 and VGG16, CAM and FMCG, bf16 + channels_last.
        "eval_speed": (
            "eval_speed.py",
            [
                "--device",
                "cuda",
                "--num-maps",
                "50000",
                "--reference-limit",
                "500",
                "--out",
                str(RESULTS / "eval_speed_cuda.json"),
            ],
            "eval_speed_cuda.json",
        ),
        "input_pipeline": (
            "input_pipeline.py",
            ["--device", "cuda", "--out", str(RESULTS / "input_pipeline_cuda.json")],
            "input_pipeline_cuda.json",
        ),
        "step_cost": (
            "step_cost.py",
            ["--device", "cuda", "--backbone", "resnet50", "--image-size", "224", "--batch-size", "64"],
            "step_cost_resnet50_cuda.json",
        ),
        "train_throughput": (
            "train_throughput.py",
            [
                "--device",
                "cuda",
                "--backbone",
                "resnet50,vgg16",
                "--method",
                "cam,fmcg",
                "--synthetic-size",
                "256",
                "--num-train",
                "4096",
                "--batch-size",
                "64",
                "--skip-torch-loader",
            ],
            "train_throughput_cuda.json",
        ),
        "localize_speed": (
            "localize_speed.py",
            [
                "--device",
                "cuda",
                "--backbones",
                "resnet50,vgg16",
                "--num-threads",
                "8",
                "--out",
                str(RESULTS / "localize_speed_cuda.json"),
            ],
            "localize_speed_cuda.json",
        ),
        "extract_speed": (
            "extract_speed.py",
            ["--device", "cuda", "--num-images", "4096", "--backbones", "resnet50,vgg16", "--batch-size", "128"],
            "extract_speed_cuda.json",
        ),
        "train_scaling": (
            "train_scaling.py",
            [
                "--use-gpu",
                "--workers",
                "1",
                "--backbone",
                "resnet50",
                "--synthetic-size",
                "256",
                "--num-train",
                "4096",
                "--batch-size",
                "64",
                "--cpus-per-worker",
                "8",
            ],
            "train_scaling_gpu.json",
        ),
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=sorted(PLANS))
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per benchmark (default: none)")
    args = parser.parse_args(argv)
    plan = PLANS[args.device]
    names = [n for n in (args.only.split(",") if args.only else plan) if n]
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in plan]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown} for {args.device}; known: {', '.join(plan)}")
    names = [n for n in names if n not in args.skip.split(",")]

    index = {"device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "benchmarks": {}}
    failed = []
    for name in names:
        script, script_args, result = plan[name]
        command = [sys.executable, str(HERE / script), *script_args]
        print(f"[bench] {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.run(
                command, timeout=args.timeout or None, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        wall = time.perf_counter() - start
        path = RESULTS / result
        index["benchmarks"][name] = {
            "command": " ".join(["python", f"benchmarks/{script}", *script_args]),
            "exit_status": rc,
            "wall_s": round(wall, 1),
            "result": str(path.relative_to(HERE.parent)) if path.is_file() else None,
        }
        print(f"[bench] {name}: exit {rc} in {wall:.0f} s -> {path if path.is_file() else 'no result'}", flush=True)
        if rc != 0:
            failed.append(name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"index_{args.device}.json").write_text(json.dumps(index, indent=2) + "\n")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
