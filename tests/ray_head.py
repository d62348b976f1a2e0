"""A ``ray start`` head for the tests: the helpers that start one and wait until it is usable
(``tests/test_ray_job_submit.py``, ``tests/test_cluster_auth.py``), and the head that the training
jobs of one pytest worker share (the ``ray_head`` fixture of ``tests/conftest.py``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


#: Driver code: a stand-in for a Train controller (an actor) that launches Ray Train's real
#: placement-group cleaner through Ray Train's own callback, as every TrainController does at its
#: start; ``controller_with_cleaner()`` makes one (``tests/test_placement_groups.py``,
#: ``benchmarks/leftover_cleaners.py``).
STAND_IN_CONTROLLER = r"""
import types
import ray
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

@ray.remote(num_cpus=0)
class Controller:
    def launch_cleaner(self):
        callback = PlacementGroupCleanerCallback()
        callback.after_controller_start(types.SimpleNamespace(run_id="stand-in"))
        return callback._cleaner is not None

def controller_with_cleaner():
    controller = Controller.remote()
    assert ray.get(controller.launch_cleaner.remote(), timeout=300)
    return controller
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_agent_ports() -> list[str]:
    """``ray start`` options giving the head's agents free ports of their own.

    Their defaults (the job agent's HTTP port 52365 above all) are fixed numbers in the ephemeral
    range: when anything on the machine holds one, the agent stays alive with its HTTP service
    disabled ("Failed to start HTTP server ... address already in use" in dashboard_agent.log), and
    every ``ray job submit`` is refused with "No available agent" for as long as the head runs
    (seen in the suite). cluster/ray_on_slurm.py gives each job's head its own ports likewise.
    """
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        # Ray Client's 10001 likewise: with the pytest workers' shared heads up for the whole session,
        # a second head on the default port could not start its client server.
        f"--ray-client-server-port={free_port()}",
    ]


def job_submit(dashboard: int) -> list[str]:
    """``ray job submit`` to the head whose dashboard listens on ``dashboard``; the job's options
    and ``-- command`` follow."""
    return [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}"]


def wait_for_head(head: RayHead, dashboard: int, timeout: float = 300) -> int:
    """Wait until the head's dashboard answers; its HTTP status without credentials (401 when the
    head requires a token)."""
    deadline = time.time() + timeout
    while True:
        assert head.process.poll() is None, head.report()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)


#: The files the raylet of a starting node waits for (each agent writes its own port), and the
#: message with which it aborts when one is late.
AGENT_PORT_FILES = ("dashboard_agent_listen_port_", "metrics_agent_port_", "runtime_env_agent_port_")
AGENT_FILE_TIMEOUT = "Timed out waiting for file"


@dataclass
class RayHead:
    """A running ``ray start --head --block`` head: its process, its temp dir and its dashboard's
    HTTP status without credentials (``None`` without a dashboard)."""

    process: subprocess.Popen
    temp_dir: str
    status: int | None

    @property
    def output_file(self) -> Path:
        return Path(self.temp_dir) / "ray_start.out"

    def died(self, grace: float = 5.0) -> bool:
        """Whether the head has stopped, allowing ``grace`` seconds for ``ray start --block`` to
        notice a dead part (it polls its processes each second) and take the rest down."""
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def report(self) -> str:
        """What a failed test needs to tell Ray's failure from its own: whether the head still runs,
        what ``ray start`` printed (it names the part that died), and the tails of its parts' logs."""
        state = "running" if self.process.poll() is None else f"exited with {self.process.returncode}"
        parts = [f"--- the Ray head: {state}", _tail(self.output_file)]
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        for name in ("dashboard.err", "dashboard.log", "raylet.out", "gcs_server.out", "dashboard_agent.log"):
            parts += [f"--- {name}", _tail(logs / name, 1500)]
        return "\n".join(parts)


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(none)"


@contextmanager
def running_head(command: list[str], env: dict[str, str], dashboard: int | None, temp_dir: str) -> Iterator[RayHead]:
    """Start a ``ray start --head --block`` head (``command``), wait until it is up, and yield it;
    stop its whole process group on the way out (``ray start --block`` ignores SIGTERM). What it
    prints goes to ``ray_start.out`` in ``temp_dir`` (a pipe nobody reads could fill and stall it).

    A start is tried again, three times in all, when it died the one way that is Ray's and not
    the test's: the raylet gives each agent a fixed 15 s to write its port file and aborts when
    one is late ("Timed out waiting for file ...", ray-project/ray#65983), which on a loaded 2-core
    box happens after the dashboard already answered. The project's own private instances retry
    a failed start likewise (``wsol_core/train/ray_session.py``).
    """
    for attempt in range(1, 4):
        with open(Path(temp_dir) / "ray_start.out", "w") as output:
            head = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        started = RayHead(head, temp_dir, None)
        try:
            started.status = wait_for_head(started, dashboard) if dashboard is not None else None
            if _agents_up(head, temp_dir):
                yield started
                return
        finally:
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            head.wait(timeout=30)
        raylet_log = Path(temp_dir) / "session_latest" / "logs" / "raylet.out"  # this attempt's session
        assert raylet_log.is_file() and AGENT_FILE_TIMEOUT in raylet_log.read_text(), started.report()
        print(f"attempt {attempt}: the head's raylet aborted waiting for an agent's port file; starting it again")
    pytest.fail("the Ray head died three times while its agents started (ray-project/ray#65983)")


def _agents_up(head: subprocess.Popen, temp_dir: str, timeout: float = 120) -> bool:
    """True once every agent wrote its port file and the head is still alive 2 s later (past the
    raylet's check); False when the head died first."""
    deadline = time.time() + timeout
    session = Path(temp_dir) / "session_latest"
    while not all(list(session.glob(f"{prefix}*")) for prefix in AGENT_PORT_FILES):
        if head.poll() is not None:
            return False
        assert time.time() < deadline, "the head's agents did not write their ports"
        time.sleep(0.5)
    time.sleep(2)
    return head.poll() is None


@contextmanager
def shared_head() -> Iterator[str]:
    """A head that the training jobs of one pytest worker join (``RAY_ADDRESS``) instead of each
    starting a private instance: a job then skips Ray's start and shutdown and finds Ray Train's
    autoscaling coordinator already running (a 1-epoch test job: 147-168 s and about 190 s of CPU
    against 191 s and 250 s on its own instance; BENCHMARKS.md, "The suite on two workers").

    Joining a running cluster is what ``ray job submit`` and the SLURM launcher's jobs do; the tests
    of what only a private instance does (its start, pinning and retries, a killed driver taking its
    Ray with it, two instances side by side) keep starting their own. As on a private instance, the
    preemption watcher is off (``wsol_core/train/ray_session.py``). No dashboard: nothing here
    reads it, and it is the head's largest part.

    Yields the head's GCS address."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(head_env())
    from ray.util import get_node_ip_address

    # The address Ray itself gives this node: a driver that joins must find a raylet on its own
    # node's address, so a head bound to 127.0.0.1 cannot be joined by drivers on 192.0.2.x.
    address = f"{get_node_ip_address()}:{free_port()}"
    temp_dir = tempfile.mkdtemp(prefix="rays", dir="/tmp")  # short: Ray's socket paths have a length limit
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={address.rsplit(':', 1)[1]}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--dashboard-port={free_port()}",  # checked even without a dashboard: 8265 may be another instance's
        "--disable-usage-stats",
        *private_agent_ports(),
        "--block",
    ]
    with running_head(command, env, None, temp_dir):
        yield address


def head_env() -> dict[str, str]:
    """What a head started by ``ray start`` and the jobs that join it need in their environment."""
    return {
        "RAY_AUTH_MODE": "token",  # a head started by `ray start` requires token auth
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",  # the cluster already runs the locked environment
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    }


def reserved_cpus(address: str) -> tuple[float | None, str]:
    """CPUs of the head at ``address`` held by running work or kept in placement groups, from
    ``ray status``, and its text; ``None`` when ``ray status`` did not tell (it failed or took more
    than a minute on a loaded machine)."""
    env = dict(os.environ, **head_env())
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None, "`ray status` took more than 60 s"
    text = done.stdout + done.stderr
    # " 1.0/2.0 CPU" or " 0.0/2.0 CPU (0.0 used of 2.0 reserved in placement groups)"
    match = re.search(r"([\d.]+)/[\d.]+ CPU(?: \([\d.]+ used of ([\d.]+) reserved in placement groups\))?", text)
    if done.returncode != 0 or match is None:
        return None, text
    return max(float(match.group(1)), float(match.group(2) or 0.0)), text


def wait_until_free(address: str, timeout: float = 120) -> str | None:
    """What ``ray status`` said when CPUs of the head were still held ``timeout`` seconds on;
    ``None`` once none is, or when ``ray status`` never told (a check that cannot see does not
    fail a test). A job's placement groups go shortly after its driver, so a few seconds' hold is
    normal."""
    deadline = time.time() + timeout
    while True:
        held, text = reserved_cpus(address)
        if held == 0.0:
            return None
        if time.time() > deadline:
            return text if held is not None else None
        time.sleep(5)
