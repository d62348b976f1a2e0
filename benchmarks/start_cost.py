"""What starting a process costs: the imports of a job's processes, with and without bytecode.

    uv run python benchmarks/start_cost.py [--repeats 2] [--no-job]

Every Ray Train fit starts a driver, a controller, four helper actors and its workers, and each
imports torch, Ray Train and MLflow afresh; on a 2-core box that import time, not the steps a test
trains, is what the integration tests spend. Python reads a module's bytecode from
``__pycache__`` when it is there; where ``PYTHONDONTWRITEBYTECODE=1`` is set and the installer
wrote none, every process compiles every module it imports from source.

- **Imports**: each module of ``--modules`` imported in a fresh ``python -c`` process, its CPU
  seconds (user + system, ``resource.getrusage``) the median of ``--repeats`` runs, in two modes:
  ``bytecode`` (the environment as installed) and ``source`` (``PYTHONPYCACHEPREFIX`` pointed at
  an empty folder with ``PYTHONDONTWRITEBYTECODE=1``, so that Python finds no bytecode, compiles
  every module and writes nothing back).
- **Job** (unless ``--no-job``): the tests' smallest training job (``jobs/train_imagenet.py
  --method cam --epochs 1`` on 64/24/24 synthetic images of 64 px, batch 8, one Ray Train worker,
  its own local Ray instance), once per mode; the job and every process under it are sampled each
  half second (``psutil``) and each one's last CPU time kept, summed by kind (the driver,
  ``TrainController``, Ray Train's helpers, its workers, Ray's own daemons).

Writes ``benchmarks/results/start_cost.json``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

#: What the processes of a job import: the libraries, then the two entry points of ours (the
#: driver's trainer module, which Ray Train's controller loads too, and the workers' loop).
MODULES = (
    "torch",
    "torchvision",
    "ray.train.torch",
    "mlflow",
    "webdataset",
    "nvidia.dali",
    "wsol_core.train.trainer",
    "wsol_core.train.loop",
)

_PROBE = (
    "import resource, sys\n"
    "import {module}\n"
    "r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(r.ru_utime + r.ru_stime)\n"
)


def mode_env(mode: str, empty_cache: str) -> dict[str, str]:
    """The environment of a process in ``mode``: as it is, or with no bytecode to be found."""
    env = dict(os.environ)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if mode == "source":
        env.update(PYTHONPYCACHEPREFIX=empty_cache, PYTHONDONTWRITEBYTECODE="1")
    return env


def import_cpu(module: str, env: dict[str, str]) -> float:
    """CPU seconds of a fresh interpreter that imports ``module`` (the interpreter's own start included)."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {module} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def installed_bytecode(module: str = "torch") -> bool:
    """Whether ``module``'s own file has its bytecode written beside it (what the installer left)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    return Path(importlib.util.cache_from_source(spec.origin)).is_file()


DAEMONS = "Ray's daemons and idle workers"


def _kind(cmdline: str) -> str:
    # Ray renames an actor's process "ray::<class>", cut to 15 characters when its first argument
    # was short ("ray::TrainContr"), so the markers are the names' first ten characters.
    for marker, kind in (
        ("train_imagenet.py", "driver"),
        ("TrainContr", "TrainController"),
        ("RayTrainWo", "Ray Train worker"),
        ("PlacementG", "Ray Train helpers"),
        ("Synchroniz", "Ray Train helpers"),
        ("DatasetMan", "Ray Train helpers"),
        ("_Autoscali", "Ray Train helpers"),
    ):
        if marker in cmdline:
            return kind
    return DAEMONS


def job_overrides(data_dir: Path) -> list[str]:
    """The tests' smallest job (``tests/test_train_job.py``'s ``job_command``), its data in ``data_dir``."""
    return [
        "data.synthetic.num_train=64",
        "data.synthetic.num_val=24",
        "data.synthetic.num_test=24",
        "data.synthetic.size=64",
        f"data.synthetic.cache_dir={data_dir}",
        "data.batch_size=8",
        "eval.batch_size=16",
        "eval.num_vis_images=4",
        "run.num_workers=1",
    ]


def job_cpu(env: dict[str, str], workdir: Path, overrides: list[str]) -> dict:
    """Wall and CPU seconds, by kind of process, of one small training job started in ``env``."""
    import psutil

    command = [
        sys.executable,
        str(REPO / "jobs" / "train_imagenet.py"),
        "--method",
        "cam",
        "--epochs",
        "1",
        "--name",
        "start-cost",
        "--storage-path",
        str(workdir / "ray"),
        "--tracking-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        *(item for override in overrides for item in ("--set", override)),
    ]
    env = dict(env, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    env.pop("RAY_ADDRESS", None)
    seen: dict[int, tuple[float, str]] = {}
    start = time.time()
    with open(workdir / "job.log", "w") as log:
        job = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        driver = psutil.Process(job.pid)
        while job.poll() is None:
            # The job's own processes only (its private Ray instance is its child, Ray's workers the
            # raylet's), not whatever else a shared machine starts meanwhile.
            try:
                processes = [driver, *driver.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in processes:
                try:
                    with process.oneshot():
                        times, cmdline = process.cpu_times(), " ".join(process.cmdline())
                except psutil.Error:  # exited between the listing and the reading
                    continue
                kind = _kind(cmdline)
                if process.pid in seen and kind == DAEMONS:  # an actor's name goes as it exits: keep the first
                    kind = seen[process.pid][1]
                seen[process.pid] = (times.user + times.system, kind)
            time.sleep(0.5)
    wall = time.time() - start
    if job.returncode != 0:
        raise RuntimeError(f"the job failed ({job.returncode}); see {workdir / 'job.log'}")
    by_kind: dict[str, float] = collections.defaultdict(float)
    for cpu, kind in seen.values():
        by_kind[kind] += cpu
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(sum(by_kind.values()), 1),
        "cpu_s_by_kind": {k: round(v, 1) for k, v in sorted(by_kind.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-job", action="store_true", help="only the imports")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

    payload = payload_header("start_cost", argv) | {
        "installed_bytecode": installed_bytecode(),
        "python_dont_write_bytecode": os.environ.get("PYTHONDONTWRITEBYTECODE", ""),
        "imports_cpu_s": {},
    }
    with tempfile.TemporaryDirectory(prefix="start-cost-") as scratch:
        empty_cache = str(Path(scratch) / "no-bytecode")
        for module in args.modules:
            row = {}
            for mode in ("bytecode", "source"):
                runs = [import_cpu(module, mode_env(mode, empty_cache)) for _ in range(args.repeats)]
                row[mode] = round(statistics.median(runs), 2)
            row["ratio"] = round(row["source"] / row["bytecode"], 2)
            payload["imports_cpu_s"][module] = row
            print(f"{module:28s} bytecode {row['bytecode']:6.2f} s  source {row['source']:6.2f} s  x{row['ratio']}")
        if not args.no_job:
            from wsol_core.config import load_config
            from wsol_core.data.resolve import ensure_synthetic

            overrides = job_overrides(Path(scratch) / "data")
            ensure_synthetic(load_config(overrides=overrides).data.synthetic)  # neither timed job writes it
            payload["job"] = {}
            for mode in ("bytecode", "source"):
                workdir = Path(scratch) / f"job-{mode}"
                workdir.mkdir()
                payload["job"][mode] = job_cpu(mode_env(mode, empty_cache), workdir, overrides)
                job = payload["job"][mode]
                print(f"job ({mode}): {job['wall_s']} s wall, {job['cpu_s']} CPU-s {job['cpu_s_by_kind']}")
    print(f"wrote {write_result('start_cost', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
