"""The reaper of what stopped trials' Train runs leave behind
(``wsol_core/experiments/placement_groups.py``): which groups and which Ray Train cleaners it
takes, and on a real Ray head without a dashboard (the case where Ray Train's own cleaner cannot
work) that it frees exactly the orphaned group and leaves the driver's own, and stops exactly the
cleaners whose controller is dead in this or an ended job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_head import STAND_IN_CONTROLLER

from wsol_core.experiments.placement_groups import CLEANER_CLASS, ActorRecord, GroupRecord, leftover_cleaners, orphaned

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


# ---------------------------------------------------------------------------------------------
# Ray Train's cleaner, left polling when its controller dies on a head without a dashboard
# ---------------------------------------------------------------------------------------------


def _actor(**changes) -> ActorRecord:
    base = dict(
        actor_id="c1" * 16,
        class_name=CLEANER_CLASS,
        state="ALIVE",
        job_id=JOB,
        worker_id="aa" * 28,
        owner_worker_id="bb" * 28,
        node_id="00" * 28,
        pid=123,
    )
    return ActorRecord(**{**base, **changes})


def _controller(state: str, job_id: str = JOB) -> ActorRecord:
    return _actor(actor_id="c0" * 16, class_name="TrainController", state=state, job_id=job_id, worker_id="bb" * 28)


def test_a_leftover_cleaner_is_alive_and_its_controller_dead_in_this_or_an_ended_job():
    assert leftover_cleaners([_controller("DEAD"), _actor()], JOB, set()) == [_actor()]
    other_job = _actor(job_id="02000000")
    assert leftover_cleaners([_controller("DEAD", "02000000"), other_job], JOB, {"02000000"}) == [other_job]


@pytest.mark.parametrize(
    ("actors", "ended"),
    [
        ([_controller("ALIVE"), _actor()], set()),  # the controller still runs: the cleaner has work
        ([_actor()], set()),  # the owner is nowhere in the table: not ours to judge
        ([_controller("DEAD"), _actor(state="DEAD")], set()),  # already gone
        ([_controller("DEAD"), _actor(class_name="SynchronizationActor")], set()),
        ([_controller("DEAD", "02000000"), _actor(job_id="02000000")], set()),  # another job, still running
    ],
)
def test_every_other_actor_is_left_alone(actors, ended):
    assert leftover_cleaners(actors, JOB, ended) == []


#: A job that ends with its controller killed (as a Ctrl-C'd search ends): its cleaner stays.
ENDED_JOB = (
    STAND_IN_CONTROLLER
    + r"""
ray.init()
ray.kill(controller_with_cleaner())
print("RESULT " + ray.get_runtime_context().get_job_id())
"""
)

CLEANERS = (
    STAND_IN_CONTROLLER
    + r"""
import json, time
from wsol_core.experiments.placement_groups import CLEANER_CLASS, actor_records, stop_leftover_cleaners

ray.init()
job = ray.get_runtime_context().get_job_id()
running = controller_with_cleaner()  # a controller still at work
stopped = controller_with_cleaner()
ray.kill(stopped)  # as Tune kills a stopped trial's actor, and with it the controller

def cleaners():
    return {a.actor_id: (a.job_id, a.state, a.pid) for a in actor_records() if a.class_name == CLEANER_CLASS}

time.sleep(5)  # several of the cleaners' one-second polls: none of them can see its controller die
before = cleaners()
done = stop_leftover_cleaners(job)
deadline = time.time() + 60
while any(cleaners()[c][1] != "DEAD" for c in done) and time.time() < deadline:
    time.sleep(0.5)
after = cleaners()
again = stop_leftover_cleaners(job)
ray.kill(running)
print("RESULT " + json.dumps(dict(job=job, before=before, stopped=done, after=after, again=again)))
"""
)


@pytest.mark.integration
def test_on_a_head_without_a_dashboard_the_cleaners_of_dead_controllers_are_stopped(ray_head):
    import psutil
    from ray_head import head_env

    env = dict(os.environ, **head_env(), RAY_ADDRESS=ray_head, PYTHONPATH=str(ROOT))
    ended = subprocess.run([sys.executable, "-c", ENDED_JOB], env=env, capture_output=True, text=True, timeout=600)
    assert ended.returncode == 0, ended.stdout[-3000:] + ended.stderr[-3000:]
    ended_job = ended.stdout.split("RESULT ", 1)[1].strip()
    done = subprocess.run([sys.executable, "-c", CLEANERS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    before, after = result["before"], result["after"]
    ours = {c for c, (job, state, _) in before.items() if job == result["job"] and state == "ALIVE"}
    theirs = {c for c, (job, state, _) in before.items() if job == ended_job and state == "ALIVE"}
    # Ray's own cleaners: the ended job's still polls (it never will stop), and ours both do.
    assert len(theirs) == 1 and len(ours) == 2, before
    stopped = set(result["stopped"])
    assert len(stopped & ours) == 1 and theirs <= stopped and stopped <= ours | theirs, result
    assert all(after[c][1] == "DEAD" and not psutil.pid_exists(after[c][2]) for c in stopped), result
    (running,) = ours - stopped
    assert after[running][1] == "ALIVE" and result["again"] == [], result  # its controller still runs
