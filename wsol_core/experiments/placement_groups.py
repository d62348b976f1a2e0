"""Free the placement groups of Train runs whose controller died with its Tune trial.

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
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


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


@contextmanager
def reap_orphaned_placement_groups(interval_s: float = 5.0) -> Iterator[None]:
    """While the block runs (a ``tuner.fit()``), remove every ``interval_s`` seconds the
    placement groups of this driver's job whose creating actor died (module docstring), and say
    so for each."""
    import ray

    job_id = ray.get_runtime_context().get_job_id()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                done = reap_once(job_id)
            except Exception as err:  # never take the search down with a cleanup
                warnings.warn(f"placement-group reaper: {err}", stacklevel=1)
                continue
            if done is None:
                warnings.warn(
                    "this Ray has no internal placement-group table accessor: placement groups of stopped "
                    "trials are left to Ray Train's cleaner, which needs the dashboard",
                    stacklevel=1,
                )
                return
            for group in done:
                print(f"[wsol] freed the placement group {group} of a stopped trial's Train run", flush=True)

    thread = threading.Thread(target=loop, name="wsol-placement-group-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval_s + 30)
