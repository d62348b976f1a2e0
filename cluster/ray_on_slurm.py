"""What runs inside a SLURM allocation: a Ray cluster over its nodes, then the driver script.

``launch_slurm.py`` submits one :class:`RayOnSlurmJob` per allocation with one task per node
(submitit runs it through ``srun``). Every task reads its role from SLURM's environment:

- node 0 (the head) starts ``ray start --head --block`` as a subprocess in its own process group,
  publishes its address in a rendezvous folder inside the submitit folder (shared storage), waits
  until all nodes have joined (``ray.nodes()``), runs the entry point (``jobs/train_imagenet.py``,
  ``tune/search_srd.py`` or any script) as a subprocess with ``RAY_ADDRESS`` set and its own
  options passed through, then stops the cluster;
- every other node waits for that address, joins with ``ray start --address ... --block`` and
  stays until the head says it is done (or its Ray process ends).

Ray processes are stopped by process-group id, never by name (``ray stop`` would kill every Ray
on the node, another user's included, and ``ray start --block`` ignores SIGTERM by itself).

The cluster uses token authentication with a fresh token per job (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH`` pointing at a 0600 file in the rendezvous folder), and a block of ports
derived from the job id (or given), so two jobs on one node do not collide.

Preemption and time limits: submitit sends ``checkpoint()`` to the head's task on SIGUSR2 (SLURM
sends it ``--signal`` seconds before the limit). It interrupts the driver (SIGINT: the training
job marks its MLflow run KILLED and keeps its checkpoints), stops Ray, and returns the same job with
the same pinned run name and storage path, which submitit requeues (``scontrol requeue``, same job
id). The requeued job re-runs the same command, and the training job resumes its run (same Ray
Train checkpoints, same MLflow run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Ports: a block of PORT_BLOCK ports per job, starting at PORT_FIRST + (job number % PORT_SLOTS) * PORT_BLOCK.
PORT_FIRST = 20000
PORT_BLOCK = 200
PORT_SLOTS = 200  # 20000 .. 59999


class LaunchError(RuntimeError):
    """A clear failure inside the allocation (no traceback needed to understand it)."""


# ------------------------------------------------------------------------------------------ ports
@dataclasses.dataclass(frozen=True)
class RayPorts:
    """Every port a Ray node opens, from one base: ``base`` .. ``base + 199``."""

    base: int

    def __post_init__(self) -> None:
        if not 1024 <= self.base <= 65535 - PORT_BLOCK:
            raise ValueError(f"Ray port base {self.base} out of range 1024..{65535 - PORT_BLOCK}")

    @property
    def gcs(self) -> int:
        return self.base

    def head_args(self) -> list[str]:
        b = self.base
        return [
            f"--port={b}",
            f"--ray-client-server-port={b + 1}",
            f"--dashboard-port={b + 2}",
            *self.node_args(),
        ]

    def node_args(self) -> list[str]:
        b = self.base
        return [
            f"--node-manager-port={b + 3}",
            f"--object-manager-port={b + 4}",
            f"--metrics-export-port={b + 5}",
            f"--dashboard-agent-grpc-port={b + 6}",
            f"--dashboard-agent-listen-port={b + 7}",
            f"--runtime-env-agent-port={b + 8}",
            f"--min-worker-port={b + 20}",
            f"--max-worker-port={b + PORT_BLOCK - 1}",
        ]

    @classmethod
    def for_job(cls, job_id: str, base: int | None = None) -> RayPorts:
        """``base`` if given, else a block chosen by the job's number (stable across a requeue)."""
        if base:
            return cls(base)
        digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
        return cls(PORT_FIRST + (int(digits) % PORT_SLOTS) * PORT_BLOCK)


# ------------------------------------------------------------------------------------------- role
@dataclasses.dataclass(frozen=True)
class NodeRole:
    """Where this task stands in the allocation (one task per node)."""

    rank: int
    num_nodes: int
    job_id: str
    restart: int
    hostname: str

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def default_run_name(self) -> str:
        """``slurm-<job id>`` (``<array job>_<task>`` for arrays), ``local-<pid>``, ``debug-<id>``."""
        return default_run_name(self.job_id)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> NodeRole:
        """From SLURM's variables; under submitit's local or debug executor (or none), one node."""
        env = dict(os.environ if env is None else env)
        host = socket.gethostname()
        if env.get("SUBMITIT_EXECUTOR") == "local":
            return cls(
                rank=0,
                num_nodes=1,
                job_id=f"local-{env.get('SUBMITIT_LOCAL_JOB_ID', os.getpid())}",
                restart=0,
                hostname=host,
            )
        if "SUBMITIT_DEBUG_JOB_ID" in env:
            return cls(
                rank=0,
                num_nodes=1,
                job_id=f"debug-{env['SUBMITIT_DEBUG_JOB_ID'].removeprefix('DEBUG_')}",
                restart=0,
                hostname=host,
            )
        if "SLURM_JOB_ID" in env:
            if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
                job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
            else:
                job_id = env["SLURM_JOB_ID"]
            return cls(
                rank=int(env.get("SLURM_NODEID", env.get("SLURM_PROCID", "0"))),
                num_nodes=int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1"))),
                job_id=job_id,
                restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0),
                hostname=host,
            )
        return cls(rank=0, num_nodes=1, job_id=f"local-{os.getpid()}", restart=0, hostname=host)


def default_run_name(job_id: str, executor: str = "slurm") -> str:
    """The run name a job gets when none is given; stable across requeues (same job id)."""
    job_id = str(job_id).removeprefix("DEBUG_")
    if executor != "slurm" and not job_id.startswith(f"{executor}-"):
        job_id = f"{executor}-{job_id}"
    return job_id if not job_id[:1].isdigit() else f"slurm-{job_id}"


def interface_ip(name: str) -> str:
    """The IPv4 address of network interface ``name`` on this node."""
    import psutil

    addresses = psutil.net_if_addrs().get(name)
    ipv4 = [a.address for a in addresses or () if a.family == socket.AF_INET]
    if not ipv4:
        why = "no such interface" if addresses is None else "no IPv4 address"
        raise LaunchError(
            f"network interface {name!r} has {why} on {socket.gethostname()} "
            f"(interfaces: {sorted(psutil.net_if_addrs())})"
        )
    return ipv4[0]


def node_ip(role: NodeRole, interface: str = "") -> str:
    """The address this node's Ray binds: ``interface``'s if given (e.g. ib0), 127.0.0.1 for a
    one-node cluster (nothing listens outside), else the routable address Ray itself would pick."""
    if interface:
        return interface_ip(interface)
    if role.num_nodes == 1:
        return "127.0.0.1"
    import ray.util

    ip = ray.util.get_node_ip_address()
    if ip.startswith("127."):
        with contextlib.suppress(OSError):
            ip = socket.gethostbyname(socket.gethostname())
    if ip.startswith("127."):
        raise LaunchError(
            f"{role.hostname}: no routable address found for a multi-node Ray cluster (got {ip}); choose an interface with --ray-interface"
        )
    return ip


# ----------------------------------------------------------------------------------- entry point
def _option_value(args: list[str], option: str) -> str | None:
    """The value of ``option`` in ``args`` (``--opt V`` or ``--opt=V``; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(option + "="):
            value = arg[len(option) + 1 :]
    return value


@dataclasses.dataclass
class EntryPoint:
    """The driver script and its own options; the run name, storage path and tracking URI pinned.

    With ``pin_options`` (the default, for ``jobs/train_imagenet.py`` and ``tune/search_srd.py``)
    the pinned values are passed as ``--name`` / ``--storage-path`` / ``--tracking-uri`` unless
    ``args`` already has them; they always go in the environment too (``MLFLOW_TRACKING_URI``,
    ``WSOL_STORAGE_PATH``, ``WSOL_RUN_NAME``) for scripts that read it instead.
    """

    script: str
    args: list[str] = dataclasses.field(default_factory=list)
    run_name: str = ""
    storage_path: str = ""
    tracking_uri: str = ""
    pin_options: bool = True
    workdir: str = ""

    def __post_init__(self) -> None:
        # Values the user put in the entry point's own options are the ones pinned.
        self.run_name = _option_value(self.args, "--name") or self.run_name
        self.storage_path = _option_value(self.args, "--storage-path") or self.storage_path
        self.tracking_uri = _option_value(self.args, "--tracking-uri") or self.tracking_uri

    def with_run_name(self, name: str) -> EntryPoint:
        return dataclasses.replace(self, run_name=self.run_name or name)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-u", self.script, *self.args]
        if self.pin_options:
            for option, value in (
                ("--name", self.run_name),
                ("--storage-path", self.storage_path),
                ("--tracking-uri", self.tracking_uri),
            ):
                if value and _option_value(self.args, option) is None:
                    cmd += [option, value]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {}
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        if self.storage_path:
            env["WSOL_STORAGE_PATH"] = self.storage_path
        if self.run_name:
            env["WSOL_RUN_NAME"] = self.run_name
        return env


# ------------------------------------------------------------------------------ process groups
def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):  # ended while we looked
            continue
    return members


def stop_process_group(
    proc: subprocess.Popen | None, *, first: int = signal.SIGTERM, grace_s: float = 40.0, what: str = "process"
) -> int | None:
    """Stop a child started with ``start_new_session`` and everything in its process group.

    ``first`` goes to the group's leader only (``ray start --block`` drains its node on SIGTERM
    while the rest of its group still runs; a Python driver turns SIGINT into KeyboardInterrupt);
    whatever of the group is left after ``grace_s`` gets SIGTERM, then SIGKILL, by group id.
    Never looks processes up by name. Returns the leader's exit code.
    """
    if proc is None:
        return None
    pgid = proc.pid  # start_new_session: the child leads its own group

    def gone(wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            proc.poll()
            if not group_members(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    with contextlib.suppress(ProcessLookupError):
        os.kill(pgid, first)
    if not gone(grace_s):
        _log(
            f"{what} (process group {pgid}) still running {grace_s:.0f}s after {signal.Signals(first).name}: SIGTERM to the group"
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        if not gone(5.0):
            _log(f"{what} (process group {pgid}): SIGKILL to the group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            gone(10.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    return proc.returncode


def _ignore_preemption_signal() -> None:
    """In a child before exec: SLURM's ``--signal`` reaches every process of the step, but only
    submitit's handler (checkpoint) should act on it; an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _log(message: str) -> None:
    print(f"[ray_on_slurm {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------- the cluster
def _job_folder() -> Path | None:
    """The submitit folder of the running job (``%j`` filled in), if this is one."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    import submitit

    try:
        return Path(submitit.JobEnvironment().paths.folder)
    except Exception:  # noqa: BLE001 - not inside a submitit job after all
        return None


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).parent / "ray"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


class RayNode:
    """One ``ray start --block`` in its own process group, its output in a per-node log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        # A raylet has 30 s by default to register with the GCS; a node busy with other jobs (a
        # shared login node, a packed test machine) can miss that and ``ray start`` gives up.
        # Ray's own advice in that error is to raise this wait; the user's value wins.
        self.env = {"RAY_raylet_start_wait_time_s": "120", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    READY = b"Ray runtime started"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*_ray_cli(), "start", "--block", "--disable-usage-stats", *self.args]
        _log(f"starting Ray: {' '.join(cmd)} (log: {self.log_path})")
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_ignore_preemption_signal,  # noqa: PLW1509 - no threads yet
            )

    def wait_ready(self, timeout_s: float) -> bool:
        """True once ``ray start`` says the node runs; False if it exited first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
                f.seek(self._offset)
                if self.READY in f.read():
                    return True
            if not self.alive():
                return False
            time.sleep(0.5)
        raise LaunchError(f"Ray did not start within {timeout_s:.0f}s; see {self.log_path}")

    def start_until_ready(self, attempts: int = 3, timeout_s: float = 300.0) -> None:
        """Start, retrying when ``ray start`` gives up (its raylet has 30 s to register, which an
        overloaded node can miss)."""
        for attempt in range(1, attempts + 1):
            self.start()
            if self.wait_ready(timeout_s):
                return
            _log(
                f"ray start exited (code {self.proc.returncode if self.proc else '?'}), attempt {attempt} of {attempts}; its log ends with:\n{self.tail(8)}"
            )
            self.stop()
        raise LaunchError(f"Ray did not start after {attempts} attempts; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, first=signal.SIGTERM, grace_s=45.0, what="Ray node")
            self.proc = None

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""


def _wait_port(host: str, port: int, timeout_s: float, alive) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise LaunchError("the Ray head exited while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.5)
    raise LaunchError(f"the Ray head did not open {host}:{port} within {timeout_s:.0f}s")


def wait_for_nodes(address: str, expected: int, timeout_s: float, alive=lambda: True) -> int:
    """Connect to ``address`` and wait until ``expected`` nodes are alive; returns the count."""
    import threading

    import ray

    # ray.init() installs a SIGTERM handler that exits; submitit's (which ignores SIGTERM so that
    # preemption reaches checkpoint() through SIGUSR2) must stay in place.
    restore = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except ConnectionError as err:
            raise LaunchError(f"cannot connect to the Ray head at {address}: {err}") from err
        deadline = time.monotonic() + timeout_s
        count = 0
        while True:
            count = sum(1 for node in ray.nodes() if node.get("Alive"))
            if count >= expected:
                return count
            if not alive():
                raise LaunchError("the Ray head exited while waiting for the nodes")
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"only {count} of {expected} Ray nodes joined within {timeout_s:.0f}s (see the ray_node*.log files)"
                )
            time.sleep(1.0)
    finally:
        ray.shutdown()
        if restore:
            signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------- the job
@dataclasses.dataclass
class ClusterSpec:
    """How the job builds its Ray cluster; everything here is chosen at submission."""

    cpus_per_node: int = 0  # 0: SLURM_CPUS_ON_NODE, else what Ray detects
    gpus_per_node: int = 0
    port_base: int = 0  # 0: derived from the job id
    join_timeout_s: float = 300.0
    driver_grace_s: float = 60.0  # SIGINT -> SIGKILL for the driver on preemption/time limit
    include_dashboard: bool = True
    temp_root: str = "/tmp"
    interface: str = ""  # network interface whose address Ray binds on every node; "" to let Ray pick
    rendezvous_root: str = ""  # shared folder when not in a submitit job folder (debug executor)


class RayOnSlurmJob:
    """The submitit callable: run on every node of the allocation (one task per node)."""

    def __init__(self, entry: EntryPoint, spec: ClusterSpec | None = None) -> None:
        self.entry = entry
        self.spec = spec or ClusterSpec()
        self._runtime: dict[str, Any] = {}

    # Popen objects and the like never travel in a pickle (submission, checkpoint).
    def __getstate__(self) -> dict[str, Any]:
        return {"entry": self.entry, "spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entry = state["entry"]
        self.spec = state["spec"]
        self._runtime = {}

    # ------------------------------------------------------------------------------ submitit
    def __call__(self) -> dict[str, Any]:
        role = NodeRole.from_env()
        self.entry = self.entry.with_run_name(role.default_run_name)
        rendezvous = self._rendezvous(role)
        ports = RayPorts.for_job(role.job_id, self.spec.port_base)
        _log(
            f"{role.hostname}: node {role.rank} of {role.num_nodes}, job {role.job_id} (restart {role.restart}), Ray ports {ports.base}..{ports.base + PORT_BLOCK - 1}"
        )
        if role.is_head:
            return self._run_head(role, ports, rendezvous)
        return self._run_worker(role, ports, rendezvous)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preemption / time limit (head only): stop the driver and Ray, requeue the same run."""
        import submitit

        _log(
            f"checkpoint: stopping the entry point (SIGINT, {self.spec.driver_grace_s:.0f}s grace) and Ray; requeueing run {self.entry.run_name!r}"
        )
        self._runtime["stopping"] = True
        driver = self._runtime.get("driver")
        if driver is not None:
            code = stop_process_group(driver, first=signal.SIGINT, grace_s=self.spec.driver_grace_s, what="entry point")
            _log(f"entry point stopped (exit code {code})")
        self._teardown(remove_temp=True, role=self._runtime.get("role"))
        return submitit.helpers.DelayedSubmission(RayOnSlurmJob(copy.deepcopy(self.entry), copy.deepcopy(self.spec)))

    # ----------------------------------------------------------------------------- internals
    def _rendezvous(self, role: NodeRole) -> Path:
        """A folder every node sees (shared storage): the head's address, its token, ``done``."""
        root = _job_folder() or (Path(self.spec.rendezvous_root) if self.spec.rendezvous_root else Path.cwd())
        path = root / "ray_rendezvous" / f"{role.job_id}.{role.restart}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log_dir(self, rendezvous: Path) -> Path:
        return _job_folder() or rendezvous

    def _ray_env(self, token_path: Path, loopback: bool) -> dict[str, str]:
        env = dict(os.environ)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        if loopback:
            # Ray turns --node-ip-address=127.0.0.1 into the routable address unless told that
            # this is a single-machine cluster: then every Ray port binds 127.0.0.1 only (and no
            # other node could join, so one-node clusters only).
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Workers run the nodes' own environment (the image's or the shared venv's Python), not a
        # `uv run` re-created per job from an uploaded working directory (Ray's uv hook, which
        # triggers whenever any ancestor process is `uv run`).
        env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
        # Ray is stopped once the driver is done (or stopped): nothing is left to drain, so the
        # node's SIGTERM drain (up to 30 s by default, meant for Ray Serve) only delays the job's end.
        env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def _resources(self) -> list[str]:
        cpus = self.spec.cpus_per_node or int(os.environ.get("SLURM_CPUS_ON_NODE", "0") or 0)
        args = [f"--num-cpus={cpus}"] if cpus else []
        return [*args, f"--num-gpus={self.spec.gpus_per_node}"]

    def _temp_dir(self, role: NodeRole) -> str:
        return str(Path(self.spec.temp_root) / f"wsol-ray-{role.job_id}.{role.restart}")

    def _run_head(self, role: NodeRole, ports: RayPorts, rendezvous: Path) -> dict[str, Any]:
        self._runtime.update(rendezvous=rendezvous, role=role)
        ok = False
        try:
            token_path = rendezvous / "auth_token"
            with open(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                f.write(secrets.token_hex(32))
            ip = node_ip(role, self.spec.interface)
            if ip.startswith("127.") and role.num_nodes > 1:
                raise LaunchError(
                    f"a {role.num_nodes}-node Ray cluster cannot use a loopback address ({ip}); choose another --ray-interface"
                )
            env = self._ray_env(token_path, loopback=ip.startswith("127."))
            head = RayNode(
                [
                    "--head",
                    f"--node-ip-address={ip}",
                    *ports.head_args(),
                    f"--include-dashboard={str(self.spec.include_dashboard).lower()}",
                    "--dashboard-host=127.0.0.1",
                    f"--temp-dir={self._temp_dir(role)}",
                    *self._resources(),
                ],
                env,
                self._log_dir(rendezvous) / f"{role.job_id}_ray_node{role.rank}.log",
            )
            self._runtime["head"] = head
            address = f"{ip}:{ports.gcs}"
            head.start_until_ready()
            _wait_port(ip, ports.gcs, 60.0, head.alive)
            (rendezvous / "head.json.tmp").write_text(json.dumps({"address": address, "token_path": str(token_path)}))
            (rendezvous / "head.json.tmp").rename(rendezvous / "head.json")
            os.environ.update(
                {
                    k: env[k]
                    for k in (
                        "RAY_AUTH_MODE",
                        "RAY_AUTH_TOKEN_PATH",
                        "RAY_ENABLE_UV_RUN_RUNTIME_ENV",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                    )
                    if k in env
                }
            )
            t0 = time.monotonic()
            try:
                n = wait_for_nodes(address, role.num_nodes, self.spec.join_timeout_s, head.alive)
            except LaunchError:
                if not head.alive():
                    _log(f"the Ray head's log ends with:\n{head.tail()}")
                raise
            _log(f"Ray cluster up at {address}: {n} node(s) in {time.monotonic() - t0:.1f}s")
            code = self._run_driver(env, address)
            if self._runtime.get("stopping"):
                raise LaunchError("stopped for preemption / time limit")
            if code != 0:
                raise LaunchError(f"the entry point {self.entry.script} exited with code {code}")
            ok = True
            return {
                "returncode": code,
                "run_name": self.entry.run_name,
                "ray_address": address,
                "job_id": role.job_id,
                "num_nodes": n,
            }
        finally:
            self._teardown(remove_temp=ok, role=role)

    def _run_driver(self, ray_env: dict[str, str], address: str) -> int:
        env = {**ray_env, **self.entry.environment(), "RAY_ADDRESS": address}
        cmd = self.entry.command()
        _log(f"running the entry point: {' '.join(cmd)}")
        sys.stdout.flush()
        sys.stderr.flush()
        driver = subprocess.Popen(
            cmd, env=env, cwd=self.entry.workdir or None, start_new_session=True, preexec_fn=_ignore_preemption_signal
        )  # noqa: PLW1509
        self._runtime["driver"] = driver
        # Poll rather than wait(): submitit's SIGUSR2 handler (checkpoint) runs in this thread and
        # must be able to reap the driver, which a blocked wait() holding Popen's lock prevents.
        while (code := driver.poll()) is None:
            time.sleep(0.5)
        self._runtime.pop("driver", None)
        _log(f"the entry point exited with code {code}")
        return code

    def _teardown(self, remove_temp: bool = False, role: NodeRole | None = None) -> None:
        rendezvous: Path | None = self._runtime.get("rendezvous")
        if rendezvous is not None:
            with contextlib.suppress(OSError):
                (rendezvous / "done").touch()
        head: RayNode | None = self._runtime.pop("head", None)
        if head is not None:
            _log("stopping the Ray head")
            head.stop()
        if remove_temp and role is not None:
            shutil.rmtree(self._temp_dir(role), ignore_errors=True)

    def _run_worker(self, role: NodeRole, ports: RayPorts, rendezvous: Path) -> dict[str, Any]:
        # The head may retry its own start (up to 3 x 300 s) before it publishes its address.
        deadline = time.monotonic() + self.spec.join_timeout_s + 900
        head_file = rendezvous / "head.json"
        while not head_file.exists():
            if (rendezvous / "done").exists() or time.monotonic() > deadline:
                raise LaunchError(
                    f"node {role.rank}: the Ray head did not publish its address in {rendezvous} (or gave up)"
                )
            time.sleep(1.0)
        info = json.loads(head_file.read_text())
        ip_args = [f"--node-ip-address={interface_ip(self.spec.interface)}"] if self.spec.interface else []
        node = RayNode(
            [
                f"--address={info['address']}",
                *ip_args,
                *ports.node_args(),
                f"--temp-dir={self._temp_dir(role)}",
                *self._resources(),
            ],
            self._ray_env(Path(info["token_path"]), loopback=False),
            self._log_dir(rendezvous) / f"{role.job_id}_ray_node{role.rank}.log",
        )
        try:
            node.start_until_ready()
            while node.alive() and not (rendezvous / "done").exists():
                time.sleep(2.0)
            reason = (
                "the head is done"
                if (rendezvous / "done").exists()
                else f"Ray exited (code {node.proc.returncode if node.proc else '?'})"
            )
            _log(f"node {role.rank}: leaving, {reason}")
        finally:
            node.stop()
            shutil.rmtree(self._temp_dir(role), ignore_errors=True)
        return {"node": role.rank, "job_id": role.job_id}


def run_direct(entry: EntryPoint) -> int:
    """The single-node path without SLURM or ``ray start``: the entry point starts a local Ray."""
    env = {**os.environ, **entry.environment()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = entry.command()
    _log(f"running the entry point with a local Ray: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, cwd=entry.workdir or None)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()
