"""What Ray Train's leftover placement-group cleaners cost a head without a dashboard, and what
stopping them gives back.

    uv run python benchmarks/leftover_cleaners.py [--cleaners 5] [--window 60]
    # -> benchmarks/results/leftover_cleaners.json

A Train run's detached ``PlacementGroupCleaner`` outlives a controller that dies with its Tune
trial (ASHA's early stop, a Ctrl-C) and, without the dashboard's state API, polls for it once a
second for as long as the cluster runs (``wsol_core/experiments/placement_groups.py``). This starts
a ``ray start --head --include-dashboard=false`` head as the test suite's shared heads are started
(``tests/ray_head.shared_head``; a user's dashboard-less cluster likewise) and samples the CPU of
every process of the head over three windows of ``--window`` seconds each:

1. ``idle``: the head alone;
2. ``leftovers``: after a job that launched ``--cleaners`` cleaners through Ray Train's own
   callback (each from a stand-in controller actor) and ended with those controllers killed, as
   the suite's search leaves them (five, seen on the pytest worker's head 25 min later);
3. ``stopped``: after :func:`~wsol_core.experiments.placement_groups.stop_leftover_cleaners`.

Each window's CPU seconds are summed by kind (the cleaners, the log monitor, which ships every
line a cleaner logs, GCS and raylet, the rest) and given as a share of one core.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the suite's own head: tests/ray_head.py

from ray_head import STAND_IN_CONTROLLER, head_env, shared_head  # noqa: E402

from benchmarks._common import payload_header, write_result  # noqa: E402

#: A job that launches Ray Train's cleaner from N stand-in controllers, kills them and ends.
LEAVE_CLEANERS = (
    STAND_IN_CONTROLLER
    + r"""
import sys
ray.init()
controllers = [controller_with_cleaner() for _ in range(int(sys.argv[1]))]
for controller in controllers:
    ray.kill(controller)
"""
)

STOP_CLEANERS = r"""
import ray
from wsol_core.experiments.placement_groups import stop_leftover_cleaners

ray.init()
print("STOPPED", len(stop_leftover_cleaners(ray.get_runtime_context().get_job_id())))
"""


def kind_of(command: str) -> str:
    """The kind of a head's process, from its command line (Ray titles its workers ``ray::Class``)."""
    if "PlacementGroupCleaner" in command:
        return "leftover cleaners"
    if "log_monitor.py" in command:
        return "log monitor"
    if "gcs_server" in command or "/raylet" in command:
        return "GCS and raylet"
    return "the rest of the head"


def cpu_by_kind(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> dict[str, float]:
    """CPU seconds per kind between two samples (``pid -> (cpu_s, command)``); a process that
    appeared in between counts from zero, one that exited is left out (its last second is lost)."""
    spent: dict[str, float] = collections.defaultdict(float)
    for pid, (cpu_s, command) in after.items():
        spent[kind_of(command)] += cpu_s - before.get(pid, (0.0, ""))[0]
    return {kind: round(value, 2) for kind, value in sorted(spent.items())}


def sample(root_pid: int) -> dict[int, tuple[float, str]]:
    import psutil

    found = {}
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            with process.oneshot():
                times = process.cpu_times()
                found[process.pid] = (times.user + times.system, " ".join(process.cmdline()))
        except psutil.Error:
            continue
    return found


def measure_window(root_pid: int, seconds: float) -> dict:
    """CPU by kind of ``root_pid``'s descendants over ``seconds``."""
    before, began = sample(root_pid), time.monotonic()
    time.sleep(seconds)
    after, elapsed = sample(root_pid), time.monotonic() - began
    spent = cpu_by_kind(before, after)
    return {
        "seconds": round(elapsed, 1),
        "cpu_s": spent,
        "share_of_a_core_pct": {kind: round(100 * value / elapsed, 2) for kind, value in spent.items()},
        "cleaners_running": sum("PlacementGroupCleaner" in command for _, command in after.values()),
    }


def run_driver(code: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    if done.returncode:
        raise RuntimeError(f"driver failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cleaners", type=int, default=5, help="leftover cleaners to leave (default: 5)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds sampled per window (default: 60)")
    parser.add_argument("--out", default=None, help="result file (default: benchmarks/results/leftover_cleaners.json)")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head_env() | {"PYTHONPATH": str(REPO)}
    with shared_head() as address:  # the head's processes are this process's descendants
        env["RAY_ADDRESS"] = address
        windows = {"idle": measure_window(os.getpid(), args.window)}
        run_driver(LEAVE_CLEANERS, str(args.cleaners), env=env)
        time.sleep(5)  # past the cleaners' start-up
        windows["leftovers"] = measure_window(os.getpid(), args.window)
        stopped = int(run_driver(STOP_CLEANERS, env=env).split("STOPPED", 1)[1])
        time.sleep(5)
        windows["stopped"] = measure_window(os.getpid(), args.window)
    payload = payload_header("leftover_cleaners", argv) | {
        "cleaners_left": args.cleaners,
        "cleaners_stopped": stopped,
        "windows": windows,
    }
    print(f"wrote {write_result('leftover_cleaners', payload, args.out)}")
    for name, window in windows.items():
        print(f"{name:10s} {window['share_of_a_core_pct']}  cleaners running: {window['cleaners_running']}")


if __name__ == "__main__":
    main()
