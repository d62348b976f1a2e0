"""Connecting to Ray the same way from every entry point.

Two things go wrong with a local Ray instance on a shared workstation, and both are handled here:

* **Several jobs at once.** Each job starts its own private instance. Ray's state API (which
  Ray Train's placement-group cleaner uses to watch its controller) resolves "the" local instance
  when no address is given, and refuses to choose once two run: "Found multiple active Ray
  instances". A private instance is therefore *pinned*: its GCS port is chosen before the start,
  and ``RAY_ADDRESS`` pointing at it is put in the job's runtime environment, which Ray hands to
  every worker and actor of the job (Train controllers and their cleaners, Tune trials).
* **A busy machine.** Ray gives its raylet a fixed 30 s to register once the processes are up
  ("The current node timed out during startup"); at a load of about 10 on 2 cores a start can
  miss it after minutes. The start is watched (a line every ``WSOL_RAY_START_REPORT_S`` seconds
  saying that Ray is still starting and how busy the machine is), the processes of a failed
  attempt are stopped, and the start is tried again, ``WSOL_RAY_START_ATTEMPTS`` times in all;
  then :class:`RayStartError` says what happened and what to do.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager

ATTEMPTS_ENV = "WSOL_RAY_START_ATTEMPTS"
DEFAULT_ATTEMPTS = 3
REPORT_EVERY_ENV = "WSOL_RAY_START_REPORT_S"
DEFAULT_REPORT_EVERY_S = 20.0
#: Seconds between attempts, times the attempt number: a short breath for the machine.
PAUSE_BETWEEN_ATTEMPTS_S = 5.0
#: The exit status of an entry point whose local Ray could not start (sysexits' EX_TEMPFAIL:
#: "a temporary failure ... the user is invited to retry").
EXIT_RAY_START = 75

#: Failures of a local start that another attempt can cure: timeouts of a starved process, a
#: port taken between choosing it and binding it.
_TRANSIENT_MARKS = (
    "timed out",
    "timeout",
    "deadline exceeded",
    "address already in use",
    "failed to start",
    "failed to connect",
)

#: Ray Train V2 starts a preemption watcher beside every fit's controller: one more actor (6-7 s
#: of CPU to start on 2 cores, BENCHMARKS.md) that polls Ray Core for nodes being drained. A
#: private local instance is one node that no autoscaler drains, so there it is off unless the
#: user sets the variable; a cluster joined by address keeps Ray's default.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

#: At its first driver a raylet starts one idle Python worker per CPU, ready for that job's tasks.
#: A private instance's job carries a runtime environment (:func:`private_runtime_env`), so those
#: workers, started without it, never serve it: each one imports Ray and idles until the end (two
#: on a 2-CPU box, about 1.2 s of CPU together; BENCHMARKS.md). Off for a private instance unless
#: the user sets the variable; a cluster's raylets keep Ray's default.
PRESTART_ENV = "RAY_prestart_worker_first_driver"

_pinned_address: str | None = None  # the private instance this process started, once started


class RayStartError(RuntimeError):
    """A private local Ray instance could not be started; the message says why and what to do."""


def report_start_failure(err: RayStartError) -> int:
    """What every entry point does with a :class:`RayStartError`: print it with its notes (the
    MLflow run's FAILED line and the resume hint, where there is a run), no internal traceback,
    and return :data:`EXIT_RAY_START` as the exit status."""
    print("\n".join([f"error: {err}", *getattr(err, "__notes__", [])]), file=sys.stderr)
    return EXIT_RAY_START


def machine_load() -> str:
    """``"load 9.7 on 2 cores"``, with ``"the machine is busy"`` in front when it is."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    text = f"load {load:.1f} on {cores} cores"
    return f"the machine is busy ({text})" if load > cores else text


def init_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``, as set inside ``ray job submit``), else start a
    private local instance, pinned and retried as the module docstring says.

    A private instance never attaches to another user's ``ray start`` on the same machine. Its
    workers run this very interpreter (the project's environment), so Ray's ``uv run`` hook, which
    would rebuild the environment from the working directory and fails when the command starts
    outside the repository, is turned off for it (a value the user set wins).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address == _pinned_address:
        address = None  # our own instance, shut down since: start a new one
    if address is None:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # read when ray is imported
    import ray

    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return
    _start_private_instance()


def _start_private_instance() -> None:
    global _pinned_address
    import ray

    attempts = _positive_int(ATTEMPTS_ENV, DEFAULT_ATTEMPTS)
    report_every = float(os.environ.get(REPORT_EVERY_ENV) or DEFAULT_REPORT_EVERY_S)
    began = time.monotonic()
    for attempt in range(1, attempts + 1):
        gcs_address = f"{ray.util.get_node_ip_address()}:{_free_port()}"
        try:
            with (
                _reporting_while_starting(attempt, attempts, report_every),
                _stopping_leftovers_on_failure(),
                _environment(
                    RAY_GCS_SERVER_PORT=gcs_address.rsplit(":", 1)[1],
                    **{PRESTART_ENV: os.environ.get(PRESTART_ENV, "0")},
                ),
            ):
                ray.init(address="local", log_to_driver=True, runtime_env=private_runtime_env(gcs_address))
        except Exception as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            if not _looks_transient(err):
                raise
            if attempt == attempts:
                raise RayStartError(
                    f"could not start a local Ray instance in {attempts} attempt(s) over {time.monotonic() - began:.0f} s: "
                    f"{machine_load()}, and Ray's processes did not come up in time (last error: {reason}). "
                    f"What to do: run the command again when the machine is quieter (see `uptime`); allow more attempts "
                    f"with {ATTEMPTS_ENV}={attempts + 2}; or start one instance yourself (`ray start --head`) and give "
                    f"its address to every job (--ray-address or RAY_ADDRESS), so that jobs share it"
                ) from err
            pause = PAUSE_BETWEEN_ATTEMPTS_S * attempt
            print(
                f"[wsol] Ray did not start ({reason}): {machine_load()}; trying again in {pause:.0f} s "
                f"(attempt {attempt + 1} of {attempts})",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(pause)
            continue
        actual = ray.get_runtime_context().gcs_address
        if actual != gcs_address:  # a Ray that no longer honours RAY_GCS_SERVER_PORT: say so, don't guess
            print(
                f"[wsol] warning: the local Ray instance listens on {actual}, not on the chosen {gcs_address}; "
                f"a second job on this machine may fail to find its own instance",
                file=sys.stderr,
                flush=True,
            )
        os.environ["RAY_ADDRESS"] = actual  # for this driver's own state-API calls and the tools it spawns
        _pinned_address = actual
        return


def private_runtime_env(gcs_address: str) -> dict:
    """The runtime environment of a private instance's job, which Ray hands to every worker and
    actor of it (Train controllers, their helpers, Tune trials): the pinned address (module
    docstring) and the preemption watcher off (:data:`PREEMPTION_WATCHER_ENV`)."""
    return {
        "env_vars": {"RAY_ADDRESS": gcs_address, PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0")}
    }


def _looks_transient(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, (TimeoutError, ConnectionError)) or any(mark in text for mark in _TRANSIENT_MARKS)


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise RayStartError(f"{name}={raw!r}: expected a whole number of attempts, at least 1")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@contextmanager
def _environment(**values: str):
    """Set environment variables for the block (Ray reads ``RAY_GCS_SERVER_PORT`` and the raylet's
    settings during the start only), then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _reporting_while_starting(attempt: int, attempts: int, every: float):
    """Print a line every ``every`` seconds while the start has not returned."""
    done = threading.Event()
    began = time.monotonic()

    def report() -> None:
        while not done.wait(every):
            print(
                f"[wsol] Ray is still starting: {machine_load()}; waited {time.monotonic() - began:.0f} s "
                f"(attempt {attempt} of {attempts})",
                file=sys.stderr,
                flush=True,
            )

    reporter = threading.Thread(target=report, name="ray-start-report", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


@contextmanager
def _stopping_leftovers_on_failure():
    """A failed ``ray.init`` leaves the processes it started (GCS, raylet, dashboard, reaper)
    running; stop those, and only those, before the next attempt."""
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    try:
        yield
    except BaseException:
        import ray

        try:
            ray.shutdown()
        except Exception:  # the failed start may have left nothing to shut down
            pass
        leftovers = [child for child in me.children(recursive=True) if child.pid not in before]
        for child in leftovers:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        raise
