"""Free the placement groups of Train runs whose controller died with its Tune trial, and stop
the Ray Train cleaners those runs leave polling.

Each trial of a search or sweep runs a Ray Train (V2) run, whose controller actor reserves the
workers' CPUs/GPUs in a placement group. A trial that Tune stops (ASHA's early stop, a Ctrl-C)
ends with its actor killed, and the controller, owned by that actor, dies without removing its
group. Ray keeps a group alive until its creator job ends as well, which for a search is the
driver, hours later. Ray Train's remedy is a detached ``PlacementGroupCleaner`` actor that polls the
controller's liveness through the state API (``ray.util.state.get_actor``). That API is served by
the dashboard, so on a cluster started without one (``ray start --include-dashboard=false``) the
cleaner can never tell and keeps polling; the same happens on a machine running two Ray instances,
where the cleaner cannot choose between them ("Found multiple active Ray instances"). Measured
here (BENCHMARKS.md, "A stopped trial's placement group"): two trials of 2 CPUs on a 2-CPU head
without a dashboard, the first stopped by Tune after two reports; its group kept both CPUs
reserved and unused, the second trial's workers timed out waiting for them every 60 s, and the
search never ended.

:func:`reap_orphaned_placement_groups` does the cleaner's job from the search's driver with what
the GCS itself records for every group (no dashboard needed): a group of this driver's job that
an actor created, whose creator is dead, and that is not detached, will never be used again.
Groups the driver made itself (Tune's per-trial reservations) have no creator actor and are never
touched. Reading the GCS's placement-group table goes through Ray's internal state accessor,
the same call ``ray.util.placement_group_table`` makes (that public function drops the creator
fields); when a Ray release moves it, the reaper says so once and stands down.

The cleaner itself is the second leftover. It is detached, so it outlives the trial, and without
the state API it never learns that its controller died: it polls once a second for as long as the
cluster runs, and logs "State API may be temporarily unavailable. Continuing to monitor" each time
into the search's output. Measured in the test suite (BENCHMARKS.md, "A stopped trial's placement
group"): five such cleaners from one search were still polling on the pytest worker's head 25 min
later, about 1 % of a core each. :func:`stop_leftover_cleaners` ends the cleaners whose controller
is dead (the GCS's actor table says so, and a cleaner's owner is the controller that launched it)
and whose job is this driver's or has ended; those have nothing left to do (this job's groups are
freed by the reaper, an ended job's by the GCS). Ray offers no public call that stops an actor
without its handle (the internal ``CoreWorker.get_actor_handle`` aborts the whole process for an
actor whose handle this process never held; tried here), so the cleaner's process is sent SIGTERM
on its node, after checking that the process id is still that cleaner's; Ray then records the
actor as dead.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: The class of Ray Train V2's detached cleaner (``ray.train.v2._internal.execution.controller.
#: placement_group_cleaner``), as the GCS's actor table names it.
CLEANER_CLASS = "PlacementGroupCleaner"
#: The class of Ray Train V2's controller actor, likewise.
CONTROLLER_CLASS = "TrainController"


@dataclass(frozen=True)
class GroupRecord:
    """What the GCS records of one placement group, as the reaper reads it."""

    group_id: bytes
    state: str  # PENDING / PREPARED / CREATED / RESCHEDULING / REMOVED
    creator_job_id: str  # hex
    creator_actor_id: str  # hex; all 'f' (nil) when a driver created the group
    creator_actor_dead: bool
    is_detached: bool


def orphaned(record: GroupRecord, job_id: str) -> bool:
    """A group of job ``job_id`` created by an actor that is now dead, still holding resources."""
    created_by_actor = bool(record.creator_actor_id) and set(record.creator_actor_id) != {"f"}
    return (
        record.creator_job_id == job_id
        and created_by_actor
        and record.creator_actor_dead
        and not record.is_detached
        and record.state != "REMOVED"
    )


def placement_group_records() -> list[GroupRecord] | None:
    """Every placement group the GCS knows, or ``None`` when this Ray has no accessor for them."""
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table_data = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated, no stubs
        raw = state._connect_and_get_accessor().get_placement_group_table()
    except (ImportError, AttributeError):
        return None
    states = table_data.PlacementGroupState
    records = []
    for blob in raw:
        data = table_data.FromString(blob)
        records.append(
            GroupRecord(
                group_id=data.placement_group_id,
                state=states.Name(data.state),
                creator_job_id=data.creator_job_id.hex(),
                creator_actor_id=data.creator_actor_id.hex(),
                creator_actor_dead=data.creator_actor_dead,
                is_detached=data.is_detached,
            )
        )
    return records


def reap_once(job_id: str) -> list[str] | None:
    """Remove this job's orphaned groups; their ids (hex), or ``None`` when the table is unreadable."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    records = placement_group_records()
    if records is None:
        return None
    removed = []
    for record in records:
        if orphaned(record, job_id):
            # Ray Train's own cleaner may have got there first (with a dashboard): that is fine.
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(record.group_id)))
            except Exception as err:  # a group removed in between, or a GCS hiccup: next round
                warnings.warn(f"could not remove orphaned placement group {record.group_id.hex()}: {err}", stacklevel=1)
                continue
            removed.append(record.group_id.hex())
    return removed


@dataclass(frozen=True)
class ActorRecord:
    """What the GCS records of one actor, as :func:`leftover_cleaners` reads it (ids in hex)."""

    actor_id: str
    class_name: str
    state: str  # DEPENDENCIES_UNREADY / PENDING_CREATION / ALIVE / RESTARTING / DEAD
    job_id: str
    worker_id: str  # the worker process that runs (or ran) the actor
    owner_worker_id: str  # the worker that created it: a Train controller, for a cleaner
    node_id: str
    pid: int


def leftover_cleaners(actors: list[ActorRecord], job_id: str, ended_jobs: set[str]) -> list[ActorRecord]:
    """Ray Train cleaners still alive whose controller (their owner) is dead, of job ``job_id`` or
    of a job that has ended (module docstring): polling for nothing."""
    dead_workers = {actor.worker_id for actor in actors if actor.state == "DEAD"}
    return [
        actor
        for actor in actors
        if actor.class_name == CLEANER_CLASS
        and actor.state == "ALIVE"
        and actor.owner_worker_id in dead_workers
        and (actor.job_id == job_id or actor.job_id in ended_jobs)
    ]


def actor_records() -> list[ActorRecord] | None:
    """Every actor the GCS knows, or ``None`` when this Ray has no accessor for them."""
    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        table_data = gcs_pb2.ActorTableData  # type: ignore[attr-defined]  # generated, no stubs
        raw = state._connect_and_get_accessor().get_actor_table(None, None)
    except (ImportError, AttributeError):
        return None
    records = []
    for blob in raw:
        data = table_data.FromString(blob)
        records.append(
            ActorRecord(
                actor_id=data.actor_id.hex(),
                class_name=data.class_name,
                state=table_data.ActorState.Name(data.state),
                job_id=data.job_id.hex(),
                worker_id=data.address.worker_id.hex(),
                owner_worker_id=data.owner_address.worker_id.hex(),
                node_id=data.address.node_id.hex(),
                pid=data.pid,
            )
        )
    return records


def ended_jobs() -> set[str]:
    """The ids (hex) of the cluster's jobs whose driver has exited."""
    from ray._private.state import state

    return {job["JobID"] for job in state.job_table() if job["IsDead"]}


def terminate_cleaner(pid: int) -> bool:
    """SIGTERM to the cleaner running as ``pid`` on this node (SIGKILL if it lingers); False when
    that process id no longer belongs to a cleaner (it exited, and the id may have been reused)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if CLEANER_CLASS not in " ".join(process.cmdline()):  # Ray titles it ray::PlacementGroupCleaner
            return False
        process.terminate()
        try:
            process.wait(timeout=10)
        except psutil.TimeoutExpired:
            process.kill()
    except psutil.NoSuchProcess:
        return False
    return True


def stop_leftover_cleaners(job_id: str) -> list[str] | None:
    """Stop the cleaners :func:`leftover_cleaners` finds; their actor ids, or ``None`` when the
    actor table is unreadable. A cleaner on another node is stopped by a task pinned there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actors = actor_records()
    if actors is None:
        return None
    here = ray.get_runtime_context().get_node_id()
    stopped = []
    for cleaner in leftover_cleaners(actors, job_id, ended_jobs()):
        if cleaner.node_id == here:
            done = terminate_cleaner(cleaner.pid)
        else:
            remote = ray.remote(num_cpus=0)(terminate_cleaner).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(cleaner.node_id, soft=False)
            )
            done = ray.get(remote.remote(cleaner.pid), timeout=120)
        if done:
            stopped.append(cleaner.actor_id)
    return stopped


def reap_round(job_id: str) -> bool:
    """One round of the reaper: free this job's orphaned groups, then stop the leftover cleaners,
    saying so for each; False when this Ray cannot be read and the reaper should stand down."""
    groups = reap_once(job_id)
    if groups is None:
        warnings.warn(
            "this Ray has no internal placement-group table accessor: placement groups of stopped "
            "trials are left to Ray Train's cleaner, which needs the dashboard",
            stacklevel=1,
        )
        return False
    for group in groups:
        print(f"[wsol] freed the placement group {group} of a stopped trial's Train run", flush=True)
    for cleaner in stop_leftover_cleaners(job_id) or []:
        print(
            f"[wsol] stopped Ray Train's placement-group cleaner {cleaner}: its controller is dead, and "
            f"without the dashboard's state API it cannot tell and polls forever",
            flush=True,
        )
    return True


@contextmanager
def reap_orphaned_placement_groups(interval_s: float = 5.0) -> Iterator[None]:
    """While the block runs (a ``tuner.fit()``), a reaper round (:func:`reap_round`) at once (the
    leftovers of an earlier, interrupted search) and then every ``interval_s`` seconds; one more
    when the block ends normally, for the trial stopped last."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    stop = threading.Event()

    def guarded(step: Callable[[str], object]) -> bool:
        """``step(job_id)``; False only when it says to stand down. It never takes the search down."""
        try:
            return step(job_id) is not False
        except Exception as err:
            warnings.warn(f"placement-group reaper: {err}", stacklevel=1)
            return True

    def loop() -> None:
        while guarded(reap_round) and not stop.wait(interval_s):
            pass

    thread = threading.Thread(target=loop, name="wsol-placement-group-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 30)
    # Reached only when the block did not raise. Tune has killed the trials' actors by now; their
    # controllers die with them a moment later, and only then are their cleaners leftovers.
    guarded(wait_for_controllers_to_end)
    guarded(reap_round)


def wait_for_controllers_to_end(job_id: str, timeout_s: float = 30.0) -> None:
    """Wait until no Train controller of job ``job_id`` is alive (at most ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        actors = actor_records() or []
        if not any(a.class_name == CONTROLLER_CLASS and a.job_id == job_id and a.state != "DEAD" for a in actors):
            return
        time.sleep(0.5)
