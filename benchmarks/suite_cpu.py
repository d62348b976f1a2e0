"""Where the test suite's CPU goes: CPU seconds per test file and per test, by kind of process.

    uv run python benchmarks/suite_cpu.py [--interval 1] [-- PYTEST_ARGS...]

On a 2-core box the suite is CPU-bound, so its time is its CPU seconds over two: a faster suite
needs fewer CPU seconds, and this says which tests spend them. It runs pytest as the README does
(``python -m pytest -p no:cacheprovider``, the project's xdist settings, with ``PYTEST_ARGS`` after
``--``) with this module loaded as a plugin, which writes, in each xdist worker, its process id
and when each test started and ended. Meanwhile every process on the machine is sampled each
``--interval`` seconds (``psutil``), and the CPU it used since the last sample goes to

- the xdist worker it descends from (a job's driver, the Ray instance it started, Ray's workers
  and actors, a browser), else the worker named by ``PYTEST_XDIST_WORKER`` in its environment (a
  process whose parent has exited), else ``outside`` (SLURM's daemons and the jobs they run,
  anything else on the machine);
- the test that worker was running at that moment;
- a kind: the pytest worker itself (the in-process tests), a job's driver, Ray Train's controller,
  helper actors and workers, other Ray workers and actors, Ray's daemons, other.

A process that starts and ends between two samples is missed, and one that ends loses the CPU of
its last interval: the attributed total is compared with the machine's busy time (``/proc/stat``).

It also counts, per test and per file, the processes of the kinds that set a test's cost
(:data:`COUNTED`), each given to the test its owner was running when the process was first seen:
Ray Train fits (one controller each), Ray Train workers, Ray instances (one GCS server each) and
job drivers.

Writes ``benchmarks/results/suite_cpu.json``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMELINE_ENV = "WSOL_SUITE_CPU_DIR"  # set for pytest by main(): the plugin below writes there
OUTSIDE = "outside"

# ---------------------------------------------------------------------------------------------
# The plugin (``-p benchmarks.suite_cpu``): inert unless TIMELINE_ENV is set
# ---------------------------------------------------------------------------------------------


_recording = True  # False in xdist's controller, which reports the workers' tests but runs none


def _timeline_file(suffix: str) -> Path | None:
    folder = os.environ.get(TIMELINE_ENV)
    if not folder or not _recording:
        return None
    return Path(folder) / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}{suffix}"


def _append(kind: str, nodeid: str) -> None:
    path = _timeline_file(".tsv")
    if path is not None:
        with path.open("a") as out:
            out.write(f"{kind}\t{time.time():.3f}\t{nodeid}\n")


def pytest_sessionstart(session) -> None:
    global _recording
    _recording = bool(os.environ.get("PYTEST_XDIST_WORKER")) or not getattr(session.config.option, "numprocesses", 0)
    path = _timeline_file(".pid")
    if path is not None:
        path.write_text(str(os.getpid()))


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _append("start", nodeid)


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    _append("end", nodeid)


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------

#: Markers in a process's command line, first match wins. Ray renames an actor's process
#: ``ray::<Class>`` (cut to 15 characters when its first argument was short), hence ten-character
#: markers; a new Ray worker is ``default_worker.py`` until it is given an actor or a task.
KINDS = (
    ("TrainContr", "Ray Train controller"),
    ("RayTrainWo", "Ray Train workers"),
    ("PlacementG", "Ray Train helpers"),
    ("Synchroniz", "Ray Train helpers"),
    ("DatasetMan", "Ray Train helpers"),
    ("_Autoscali", "Ray Train helpers"),
    ("jobs/", "job drivers and scripts"),
    ("benchmarks/", "job drivers and scripts"),
    ("tune/", "job drivers and scripts"),
    ("bin/wsol-", "job drivers and scripts"),
    ("default_worker.py", "Ray workers and actors (other)"),
    ("ray::", "Ray workers and actors (other)"),
    ("ray/core/src", "Ray's daemons"),
    ("ray/dashboard", "Ray's daemons"),
    ("ray/_private", "Ray's daemons"),
    ("ray/autoscaler", "Ray's daemons"),
    ("ray-dashboard", "Ray's daemons"),
    ("ray.util.client", "Ray's daemons"),
    ("bin/ray ", "Ray's daemons"),
    ("mlflow", "MLflow servers"),
    ("chrom", "browser"),
)


#: Processes counted as they start, by a marker in their command line: a Train controller is one
#: Ray Train fit, a GCS server one Ray instance (a shared head, a private instance, a SLURM job's).
COUNTED = (
    ("TrainContr", "Ray Train fits"),
    ("RayTrainWo", "Ray Train workers"),
    ("gcs_server", "Ray instances"),
    ("jobs/", "job drivers"),
    ("tune/", "job drivers"),
    ("bin/wsol-", "job drivers"),
)


def counted_as(cmdline: str) -> str | None:
    return next((label for marker, label in COUNTED if marker in cmdline), None)


def kind_of(cmdline: str, worker_pids: Collection[int], pid: int) -> str:
    if pid in worker_pids:
        return "pytest worker (in-process tests)"
    for marker, kind in KINDS:
        if marker in cmdline:
            return kind
    return "other"


class Sampler:
    """CPU seconds of every process since the previous sample, each given an owner (an xdist
    worker or ``outside``) and a kind."""

    def __init__(self, timeline_dir: Path) -> None:
        import psutil

        self.psutil = psutil
        self.timeline_dir = timeline_dir
        self.cpu: dict[int, float] = {}
        self.owner: dict[int, str] = {}
        self.kind: dict[int, str] = {}
        self.samples: list[tuple[float, dict[tuple[str, str], float]]] = []
        self.first = True
        # When each process that started during the run was first seen; what it counts as (a
        # Ray worker gets its actor's name only after it starts, so the label can come later).
        self.running_before: set[int] = set()
        self.first_seen: dict[int, float] = {}
        self.counted: dict[int, str] = {}
        self.parent: dict[int, int] = {}

    def worker_pids(self) -> dict[int, str]:
        found = {}
        for path in self.timeline_dir.glob("*.pid"):
            try:
                found[int(path.read_text())] = path.stem
            except ValueError:  # being written
                pass
        return found

    def _owner(self, process, workers: dict[int, str]) -> str:
        try:
            for ancestor in [process, *process.parents()]:
                if ancestor.pid in workers:
                    return workers[ancestor.pid]
            return process.environ().get("PYTEST_XDIST_WORKER", OUTSIDE)
        except self.psutil.Error:
            return OUTSIDE

    def sample(self) -> None:
        workers = self.worker_pids()
        now = time.time()
        used: dict[tuple[str, str], float] = collections.defaultdict(float)
        for process in self.psutil.process_iter():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    total = times.user + times.system
                    pid = process.pid
                    if pid not in self.owner or (pid in workers and self.owner[pid] != workers[pid]):
                        self.owner[pid] = self._owner(process, workers)
                    cmdline = " ".join(process.cmdline())
            except self.psutil.Error:
                continue
            kind = kind_of(cmdline, workers.keys(), pid)
            if self.first:
                self.running_before.add(pid)
            elif pid not in self.running_before:
                if pid not in self.first_seen:
                    self.first_seen[pid] = now
                    try:
                        self.parent[pid] = process.ppid()
                    except self.psutil.Error:
                        pass
                label = counted_as(cmdline)
                if label is not None:
                    self.counted.setdefault(pid, label)
            # An actor's process name reverts as it exits: keep the kind it had as the actor.
            if not (kind.startswith("Ray workers") and self.kind.get(pid, kind) != kind):
                self.kind[pid] = kind
            before = self.cpu.get(pid)
            self.cpu[pid] = total
            spent = total - before if before is not None else (0.0 if self.first else total)
            if spent > 0:
                used[(self.owner[pid], self.kind[pid])] += spent
        self.first = False
        self.samples.append((now, dict(used)))

    def starts(self, timelines) -> dict[str, collections.Counter]:
        """The counted processes per test (as :func:`attribute` names tests), by label. A child
        with its parent's label is a fork of it (a torch data-loader worker keeps its Ray worker's
        name), not a start of its own."""
        stamps = {worker: [e[0] for e in events] for worker, events in timelines.items()}
        per_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for pid, label in self.counted.items():
            if self.counted.get(self.parent.get(pid, -1)) == label:
                continue
            owner = self.owner.get(pid, OUTSIDE)
            if owner in timelines:
                test = running_at(timelines[owner], stamps[owner], self.first_seen[pid])
            else:
                test = f"({owner})"
            per_test[test][label] += 1
        return per_test


def machine_busy_cpu_s() -> float:
    """CPU seconds the machine has been busy since boot (all CPUs: user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_timelines(timeline_dir: Path) -> dict[str, list[tuple[float, str, str]]]:
    timelines = {}
    for path in timeline_dir.glob("*.tsv"):
        events = []
        for line in path.read_text().splitlines():
            kind, stamp, nodeid = line.split("\t", 2)
            events.append((float(stamp), kind, nodeid))
        timelines[path.stem] = sorted(events)
    return timelines


def running_at(events: list[tuple[float, str, str]], stamps: list[float], when: float) -> str:
    """The test a worker was running at ``when`` (``(between tests)`` outside one)."""
    index = bisect.bisect_right(stamps, when) - 1
    if index < 0:
        return "(before the first test)"
    _, kind, nodeid = events[index]
    return nodeid if kind == "start" else "(between tests)"


def attribute(samples, timelines, interval: float) -> tuple[dict, dict, dict]:
    """CPU seconds per test, per test file and per owner, each split by kind."""
    stamps = {worker: [e[0] for e in events] for worker, events in timelines.items()}
    per_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_owner: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for when, used in samples:
        for (owner, kind), spent in used.items():
            per_owner[owner][kind] += spent
            if owner in timelines:
                # A sample covers the interval before ``when``; its middle decides the test.
                test = running_at(timelines[owner], stamps[owner], when - interval / 2)
            else:
                test = f"({owner})"
            per_test[test][kind] += spent
    return per_test, by_file(per_test), per_owner


def by_file(per_test: dict[str, collections.Counter]) -> dict[str, collections.Counter]:
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for test, counts in per_test.items():
        per_file[test.split("::", 1)[0]].update(counts)
    return per_file


def rows(table: dict[str, collections.Counter], top: int, starts: dict[str, collections.Counter]) -> list[dict]:
    ordered = sorted(table.items(), key=lambda item: -sum(item[1].values()))[:top]
    return [
        {
            "name": name,
            "cpu_s": round(sum(kinds.values()), 1),
            "by_kind": {k: round(v, 1) for k, v in kinds.most_common() if v >= 0.05},
            "processes_started": dict(starts.get(name, collections.Counter()).most_common()),
        }
        for name, kinds in ordered
    ]


def wall_per_file(timelines) -> dict[str, float]:
    spent: dict[str, float] = collections.defaultdict(float)
    for events in timelines.values():
        started: dict[str, float] = {}
        for stamp, kind, nodeid in events:
            if kind == "start":
                started[nodeid] = stamp
            elif nodeid in started:
                spent[nodeid.split("::", 1)[0]] += stamp - started.pop(nodeid)
    return dict(spent)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, pytest_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--top", type=int, default=40, help="tests listed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--log", default=None, help="write pytest's whole output here")
    args = parser.parse_args(ours)
    if args.interval <= 0:
        parser.error(f"--interval must be positive, got {args.interval}")

    with tempfile.TemporaryDirectory(prefix="suite-cpu-") as scratch:
        timeline_dir = Path(scratch)
        command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "benchmarks.suite_cpu", *pytest_args]
        env = dict(os.environ, **{TIMELINE_ENV: str(timeline_dir)})
        sampler = Sampler(timeline_dir)
        busy_before, start = machine_busy_cpu_s(), time.time()
        sampler.sample()
        with open(timeline_dir / "pytest.out", "w") as log:
            suite = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            while suite.poll() is None:
                time.sleep(max(0.0, args.interval - (time.time() - sampler.samples[-1][0])))
                sampler.sample()
        wall, busy = time.time() - start, machine_busy_cpu_s() - busy_before
        output = (timeline_dir / "pytest.out").read_text(errors="replace")
        timelines = read_timelines(timeline_dir)

    per_test, per_file, per_owner = attribute(sampler.samples, timelines, args.interval)
    attributed = sum(sum(kinds.values()) for kinds in per_owner.values())
    by_kind: collections.Counter = collections.Counter()
    for kinds in per_owner.values():
        by_kind.update(kinds)
    starts_per_test = sampler.starts(timelines)
    starts_total: collections.Counter = collections.Counter()
    for counts in starts_per_test.values():
        starts_total.update(counts)
    walls = wall_per_file(timelines)
    files = rows(per_file, len(per_file), by_file(starts_per_test))
    for row in files:
        row["wall_s"] = round(walls.get(row["name"], 0.0), 1)
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if " in " in line), "")
    failed = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if args.log:
        Path(args.log).write_text(output)
    payload = payload_header("suite_cpu", argv) | {
        "pytest": {"command": command[1:], "exit_code": suite.returncode, "summary": summary, "failed": failed},
        "wall_s": round(wall, 1),
        "machine_busy_cpu_s": round(busy, 1),
        "attributed_cpu_s": round(attributed, 1),
        "cpu_s_by_owner": {owner: round(sum(kinds.values()), 1) for owner, kinds in sorted(per_owner.items())},
        "cpu_s_by_kind": {kind: round(spent, 1) for kind, spent in by_kind.most_common()},
        "processes_started": dict(starts_total.most_common()),
        "files": files,
        "tests": rows(per_test, args.top, starts_per_test),
    }
    print("\n".join(output.splitlines()[-60:] if suite.returncode else failed))
    print(f"pytest: {summary} (exit {suite.returncode})")
    print(f"{wall:.0f} s wall; the machine was busy {busy:.0f} CPU-s, {attributed:.0f} of them attributed")
    print("processes started: " + ", ".join(f"{n} {label}" for label, n in starts_total.most_common()))
    for row in files[:25]:
        started = ", ".join(f"{n} {label}" for label, n in row["processes_started"].items())
        print(f"{row['cpu_s']:8.1f} CPU-s {row['wall_s']:7.1f} s  {row['name']}  ({started or 'none counted'})")
    print(f"wrote {write_result('suite_cpu', payload, args.out)}")
    return 0 if suite.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
