"""Scaling of the training job over Ray Train workers on one machine.

    uv run python benchmarks/train_scaling.py                       # CPU: 1 and 2 workers, 1 core each
    uv run python benchmarks/train_scaling.py --workers 1,2,4,8 --use-gpu --backbone resnet50 \\
        --synthetic-size 256 --num-train 16384 --batch-size 128       # GPUs: one per worker

Runs the real job (``jobs/train_imagenet.py``: Ray Train, DDP over gloo on CPU / NCCL on GPU, the
DALI loader, MLflow) once per worker count, each in a fresh local Ray instance, with the same
per-worker batch, and reads the job's own ``train/images_per_s`` (global: world x per-rank) and
``train/data_wait`` for the last epoch from its MLflow run (the first epoch includes start-up).

Efficiency per worker at n workers: ``images_per_s(n) / (n x images_per_s(1))``. On CPU each
worker gets ``--cpus-per-worker`` cores, so 2 workers use twice the cores of 1: the figure is the
cost of DDP's gradient all-reduce and of sharing the machine's memory bandwidth.
Writes ``benchmarks/results/train_scaling[_gpu].json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_job(workers: int, args, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    name = f"scaling-{workers}w"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "train_imagenet.py"),
        "--method",
        args.method,
        "--backbone",
        args.backbone,
        "--epochs",
        str(args.epochs),
        "--num-workers",
        str(workers),
        "--cpus-per-worker",
        str(args.cpus_per_worker),
        "--batch-size",
        str(args.batch_size),
        "--set",
        f"data.synthetic.num_train={args.num_train}",
        "--set",
        f"data.synthetic.size={args.synthetic_size}",
        "--set",
        "data.synthetic.num_val=64",
        "--set",
        "data.synthetic.num_test=32",
        "--set",
        "train.evaluate_test=false",
        "--set",
        f"train.eval_every={args.epochs}",
        "--set",
        "eval.num_vis_images=0",
        "--set",
        f"data.num_threads={max(1, int(args.cpus_per_worker))}",
        "--name",
        name,
        "--storage-path",
        str(workdir / "ray"),
        "--tracking-uri",
        uri,
        "--experiment",
        "scaling",
        *(["--use-gpu"] if args.use_gpu else []),
        *sum((["--set", o] for o in args.overrides), []),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(
            f"{workers} worker(s): the job failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        )
    client = MlflowClient(uri)
    run = client.search_runs(
        [client.get_experiment_by_name("scaling").experiment_id], filter_string=f"attributes.run_name = '{name}'"
    )[0]
    history = {
        k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        for k in ("train/images_per_s", "train/data_wait")
    }
    last = max(history["train/images_per_s"])
    return {
        "workers": workers,
        "images_per_s": history["train/images_per_s"][last],
        "images_per_s_per_worker": history["train/images_per_s"][last] / workers,
        "data_wait": history["train/data_wait"][last],
        "epoch_measured": last,
        "job_wall_s": wall,
        "mlflow_run_id": run.info.run_id,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--method", default="fmcg")
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-train", type=int, default=960)
    parser.add_argument("--synthetic-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--workdir", default=None, help="runs, MLflow DB (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch includes start-up and is not measured)")
    counts = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="wsol-scaling-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = []
        for n in counts:
            rows.append(run_job(n, args, workdir))
            print(
                f"{n} worker(s): {rows[-1]['images_per_s']:.1f} img/s ({rows[-1]['images_per_s_per_worker']:.1f} per worker), "
                f"data wait {rows[-1]['data_wait']:.1%}, job {rows[-1]['job_wall_s']:.0f} s",
                flush=True,
            )
    base = next((r for r in rows if r["workers"] == 1), None)
    for row in rows:
        row["efficiency_per_worker"] = row["images_per_s"] / (row["workers"] * base["images_per_s"]) if base else None
    payload = {
        **payload_header("train_scaling", argv, "cuda" if args.use_gpu else "cpu"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "rows": rows,
    }
    path = write_result("train_scaling_gpu" if args.use_gpu else "train_scaling", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
