"""The reaper of placement groups that stopped trials' Train runs leave behind
(``wsol_core/experiments/placement_groups.py``): which groups it takes, and on a real Ray head
without a dashboard (the case where Ray Train's own cleaner cannot work) that it frees exactly the
orphan and leaves the driver's own group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsol_core.experiments.placement_groups import GroupRecord, orphaned

ROOT = Path(__file__).resolve().parents[1]
JOB = "01000000"
NIL_ACTOR = "ff" * 16
CONTROLLER = "9658aef80e06c8b6da7f3e4501000000"


def _record(**changes) -> GroupRecord:
    base = dict(
        group_id=b"\x01" * 18,
        state="CREATED",
        creator_job_id=JOB,
        creator_actor_id=CONTROLLER,
        creator_actor_dead=True,
        is_detached=False,
    )
    return GroupRecord(**{**base, **changes})


def test_an_orphan_is_a_live_group_of_this_job_whose_creating_actor_died():
    assert orphaned(_record(), JOB)
    assert orphaned(_record(state="PENDING"), JOB)  # still queued for resources: as harmful


@pytest.mark.parametrize(
    "changes",
    [
        dict(creator_actor_dead=False),  # the controller still runs its trial
        dict(creator_actor_id=NIL_ACTOR),  # made by the driver (Tune's own per-trial groups)
        dict(creator_actor_id=""),
        dict(is_detached=True),  # meant to outlive its creator
        dict(creator_job_id="02000000"),  # another job's: not ours to judge
        dict(state="REMOVED"),
    ],
)
def test_the_reaper_leaves_every_other_group(changes):
    assert not orphaned(_record(**changes), JOB)


DRIVER = r"""
import json, time
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from wsol_core.experiments.placement_groups import placement_group_records, reap_once

ray.init()
job = ray.get_runtime_context().get_job_id()

@ray.remote(num_cpus=0)
class Creator:  # stands for a Train controller: an actor that reserves its workers' CPUs
    def reserve(self):
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=120)
        return group.id.hex()

own = placement_group([{"CPU": 1}])  # the driver's own, as Tune's per-trial groups are
ray.get(own.ready(), timeout=120)
creator = Creator.remote()
orphan = ray.get(creator.reserve.remote(), timeout=300)
ray.kill(creator)  # as Tune kills a stopped trial's actor, and with it the controller

def states():
    return {r.group_id.hex(): (r.state, r.creator_actor_dead) for r in placement_group_records()}

deadline = time.time() + 60
while not states()[orphan][1] and time.time() < deadline:
    time.sleep(0.5)
time.sleep(3)  # longer than any cleanup Ray would do itself
before = states()
removed = reap_once(job)
time.sleep(1)
after = states()
cpus_free = ray.available_resources().get("CPU", 0.0)
remove_placement_group(own)
print("RESULT " + json.dumps(dict(own=own.id.hex(), orphan=orphan, before=before, removed=removed, after=after, cpus_free=cpus_free)))
"""


@pytest.mark.integration
def test_on_a_head_without_a_dashboard_the_reaper_frees_the_dead_creators_group(ray_head):
    from ray_head import head_env

    env = dict(os.environ, **head_env(), RAY_ADDRESS=ray_head, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    own, orphan = result["own"], result["orphan"]
    # Ray keeps the dead actor's group while the job lives: the leak the reaper exists for.
    assert result["before"][orphan] == ["CREATED", True], result
    assert result["removed"] == [orphan], result
    assert result["after"][orphan][0] == "REMOVED" and result["after"][own][0] == "CREATED", result
    assert result["cpus_free"] == 1.0, result  # the orphan's CPU is back, the driver's still held
