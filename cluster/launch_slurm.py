"""Get a Ray cluster out of a SLURM allocation and run an entry point on it.

    uv run python cluster/launch_slurm.py [launcher options] [--] SCRIPT [SCRIPT OPTIONS...]

    # 2 nodes x 4 GPUs, training job with its own options, run resumable after preemption:
    uv run python cluster/launch_slurm.py --nodes 2 --gpus-per-node 4 --cpus-per-node 32 --mem 256G \\
        --time 1-00:00:00 --partition gpu --storage-path /shared/wsol_runs \\
        --tracking-uri http://mlflow.internal:5000 -- jobs/train_imagenet.py --method fmcg --use-gpu --num-workers 8

    # the hyperparameter search, the same way:
    uv run python cluster/launch_slurm.py --nodes 4 --gpus-per-node 8 --time 12:00:00 -- tune/search_srd.py [...]

    # on a laptop: the same code path with submitit's local (subprocess) or debug (in-process) executor,
    # or the entry point directly with a local Ray:
    uv run python cluster/launch_slurm.py --executor local -- jobs/train_imagenet.py --epochs 1
    uv run python cluster/launch_slurm.py --executor direct -- jobs/train_imagenet.py --epochs 1

Inside the allocation (``cluster/ray_on_slurm.py``): a Ray head on the first node, a Ray worker on
every other node, the entry point run as the driver once all nodes have joined, the cluster stopped
when it ends. The job is checkpointable: on preemption or at the time limit it is requeued and the
entry point re-run with the same ``--name`` and ``--storage-path`` (default name: ``slurm-<job id>``),
so the training job resumes its checkpoints and its MLflow run.

Everything is validated before anything is submitted: options, the time format, the partition
(``sinfo``), and the entry point's configuration when it uses the project's shared options.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import submitit

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from anywhere; pickles name cluster.ray_on_slurm

from cluster.ray_on_slurm import ClusterSpec, EntryPoint, RayOnSlurmJob, RayPorts, default_run_name, run_direct  # noqa: E402

EXECUTORS = ("slurm", "local", "debug", "direct")


class UsageError(Exception):
    """A problem with the options or the environment, reported in one line without a traceback."""


# ------------------------------------------------------------------------------------ validation
_TIME_FORMATS = (
    (re.compile(r"^(\d+)$"), lambda m: int(m[1]) * 60),  # minutes
    (re.compile(r"^(\d+):(\d{1,2})$"), lambda m: int(m[1]) * 60 + int(m[2])),  # minutes:seconds
    (re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})$"), lambda m: int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])),
    (re.compile(r"^(\d+)-(\d+)$"), lambda m: int(m[1]) * 86400 + int(m[2]) * 3600),  # days-hours
    (re.compile(r"^(\d+)-(\d+):(\d{1,2})$"), lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60),
    (
        re.compile(r"^(\d+)-(\d+):(\d{1,2}):(\d{1,2})$"),
        lambda m: int(m[1]) * 86400 + int(m[2]) * 3600 + int(m[3]) * 60 + int(m[4]),
    ),
)


def parse_time_minutes(text: str) -> int:
    """A SLURM time limit ("60", "1:30:00", "2-12", "1-00:00:00", ...) in whole minutes (rounded up)."""
    for pattern, seconds in _TIME_FORMATS:
        m = pattern.match(text.strip())
        if m:
            total = seconds(m)
            if total <= 0:
                raise UsageError(f"--time {text!r}: the time limit must be positive")
            return -(-total // 60)
    raise UsageError(
        f"--time {text!r}: not a SLURM time; use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 90, 4:00:00, 1-12:00:00)"
    )


_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)


def validate(args: argparse.Namespace) -> None:
    """Everything checkable without SLURM; raises :class:`UsageError`."""
    for name in ("nodes", "cpus_per_node"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node must be >= 0 (got {args.gpus_per_node})")
    if args.mem is not None and not _MEM.match(args.mem):
        raise UsageError(f"--mem {args.mem!r}: use a number with an optional K/M/G/T suffix, e.g. 64G")
    args.timeout_min = parse_time_minutes(args.time)
    if args.signal_delay_s < 0 or args.signal_delay_s >= args.timeout_min * 60:
        raise UsageError(
            f"--signal-delay-s {args.signal_delay_s} must be >= 0 and shorter than the time limit ({args.timeout_min} min)"
        )
    if args.ray_port_base:
        try:
            RayPorts(args.ray_port_base)
        except ValueError as err:
            raise UsageError(f"--ray-port-base: {err}") from None
    if args.executor != "slurm" and args.nodes > 1:
        raise UsageError(f"--executor {args.executor} runs on this machine only: --nodes must be 1 (got {args.nodes})")
    script = Path(args.script)
    if not script.is_file() and (PROJECT_ROOT / script).is_file():
        script = PROJECT_ROOT / script
    if not script.is_file():
        raise UsageError(f"entry point {args.script!r} not found (e.g. jobs/train_imagenet.py or tune/search_srd.py)")
    args.script = str(script.resolve())


def uses_shared_options(script: str) -> bool:
    """The project's entry points (``jobs/``, ``tune/``) all take ``wsol_core.cli``'s options."""
    path = Path(script).resolve()
    return any(path.is_relative_to(PROJECT_ROOT / d) for d in ("jobs", "tune"))


def precheck_config(script_args: list[str]) -> None:
    """Build the entry point's config from its shared options, so a bad one fails before submission.

    Applies to the project's entry points (they all use ``wsol_core.cli``); options the shared
    parser does not know are left to the script.
    """
    from wsol_core.cli import add_config_options, config_from_args
    from wsol_core.config import ConfigError

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_config_options(parser)
    try:
        ns, _unknown = parser.parse_known_args(script_args)
        config_from_args(ns)
    except ConfigError as err:
        raise UsageError(f"the entry point's configuration: {err}") from None
    except SystemExit:
        raise UsageError("the entry point's options do not parse (run the script with --help)") from None


def check_slurm(partition: str | None, nodes: int = 1, cpus_per_node: int = 1, gpus_per_node: int = 0) -> None:
    """SLURM's client commands are here, the controller answers, ``partition`` exists and has
    nodes that can hold the request (a request no node can hold would pend forever)."""
    missing = [cmd for cmd in ("sbatch", "sinfo", "sacct") if shutil.which(cmd) is None]
    if missing:
        raise UsageError(
            f"not on a SLURM cluster: {', '.join(missing)} not found on PATH. On this machine use "
            "--executor local (submitit subprocess), --executor debug (in-process) or --executor direct "
            "(the entry point with a local Ray); for a local test cluster see cluster/slurm_local.sh."
        )
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise UsageError("sinfo did not answer within 60 s: is slurmctld reachable?") from None
    if out.returncode != 0:
        detail = (out.stderr or out.stdout).strip().splitlines()
        raise UsageError(
            f"sinfo failed ({detail[-1] if detail else 'exit ' + str(out.returncode)}): is slurmctld running and SLURM_CONF right?"
        )
    partitions = [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]
    if not partitions:
        raise UsageError("sinfo lists no partition on this cluster")
    if partition is not None and partition not in partitions:
        raise UsageError(f"partition {partition!r} does not exist on this cluster; available: {', '.join(partitions)}")
    _check_fits(partition, nodes, cpus_per_node, gpus_per_node)


def _check_fits(partition: str | None, nodes: int, cpus_per_node: int, gpus_per_node: int) -> None:
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%c|%G|%P"]
    if partition:
        cmd[1:1] = ["-p", partition]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return  # the scheduler will judge
    fits = set()
    for line in out.splitlines():
        try:
            node, cpus, gres, part = line.split("|")
            if partition is None and not part.endswith("*"):
                continue  # only the default partition's nodes
            gpus = sum(int(m) for m in re.findall(r"gpu(?::[\w.-]+)?:(\d+)", gres))
        except ValueError:
            return
        if int(cpus.rstrip("+")) >= cpus_per_node and gpus >= gpus_per_node:
            fits.add(node)
    where = f"partition {partition!r}" if partition else "the default partition"
    if len(fits) < nodes:
        raise UsageError(
            f"{where} has {len(fits)} node(s) with >= {cpus_per_node} CPUs and >= {gpus_per_node} GPUs; "
            f"the job asks for {nodes} (see `sinfo -N -o '%N %c %G'`; lower --cpus-per-node / --gpus-per-node / --nodes)"
        )


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_slurm.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options] [--] SCRIPT [SCRIPT OPTIONS...]",
    )
    p.add_argument("script", metavar="SCRIPT", help="entry point run as the Ray driver, e.g. jobs/train_imagenet.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="SCRIPT OPTIONS", help="passed through to SCRIPT")

    a = p.add_argument_group("allocation")
    a.add_argument("--nodes", type=int, default=1, help="nodes; one Ray node on each (default 1)")
    a.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    a.add_argument("--cpus-per-node", type=int, default=4, help="CPUs per node given to Ray (default 4)")
    a.add_argument("--mem", default=None, help="memory per node, e.g. 64G (default: the partition's)")
    a.add_argument("--time", default="60", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 60)")
    a.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    a.add_argument("--account", default=None)
    a.add_argument("--qos", default=None)
    a.add_argument("--constraint", default=None, help="node features, e.g. a100")
    a.add_argument("--job-name", default=None, help="default: wsol-<script name>")
    a.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="CMD",
        help="shell line run before the job (module load ...); repeatable",
    )
    a.add_argument(
        "--signal-delay-s",
        type=int,
        default=120,
        help="SIGUSR2 this long before the time limit: checkpoint and requeue (default 120)",
    )
    a.add_argument("--max-requeues", type=int, default=3, help="requeues after time-outs before giving up (default 3)")

    r = p.add_argument_group("run (pinned, so a requeued job resumes the same run)")
    r.add_argument("--name", default="", help="run name (default: slurm-<job id>); or give --name among SCRIPT OPTIONS")
    r.add_argument(
        "--storage-path",
        default="",
        help="shared storage for checkpoints (default: $WSOL_STORAGE_PATH, else ~/wsol_runs)",
    )
    r.add_argument(
        "--tracking-uri", default="", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the entry point's)"
    )
    r.add_argument(
        "--no-pin",
        action="store_true",
        help="do not add --name/--storage-path/--tracking-uri to SCRIPT's options (environment only)",
    )
    r.add_argument("--no-precheck", action="store_true", help="do not check SCRIPT's configuration before submitting")
    r.add_argument(
        "--folder",
        default="",
        help="submitit folder: job pickles and logs per node (default: <storage path>/slurm_logs/%%j)",
    )

    y = p.add_argument_group("Ray")
    y.add_argument(
        "--ray-port-base", type=int, default=0, help="first of 200 ports for Ray (default: chosen from the job id)"
    )
    y.add_argument(
        "--ray-join-timeout-s", type=float, default=300.0, help="how long to wait for all nodes to join (default 300)"
    )
    y.add_argument(
        "--no-ray-dashboard", action="store_true", help="do not start the Ray dashboard (it binds 127.0.0.1)"
    )
    y.add_argument(
        "--ray-interface",
        default="",
        metavar="NAME",
        help="network interface Ray binds on every node, e.g. ib0 (default: Ray's choice; 127.0.0.1 on one node)",
    )
    y.add_argument("--ray-temp-root", default="/tmp", help="node-local folder for Ray's session files (default /tmp)")

    e = p.add_argument_group("executor")
    e.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="slurm",
        help="slurm (default); local / debug: submitit on this machine; direct: no submitit, local Ray",
    )
    e.add_argument(
        "--wait", action="store_true", help="wait for the SLURM job and print its result (local/debug always wait)"
    )
    e.add_argument("--dry-run", action="store_true", help="validate and print the sbatch script, submit nothing")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.script == "--":  # `launch_slurm.py [opts] -- script ...` with argparse keeping the separator
        if not args.script_args:
            parser.error("no SCRIPT after --")
        args.script, args.script_args = args.script_args[0], args.script_args[1:]
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    return args


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    return uri


def make_entry(args: argparse.Namespace) -> EntryPoint:
    entry = EntryPoint(
        script=args.script,
        args=list(args.script_args),
        run_name=args.name,
        storage_path=args.storage_path or os.environ.get("WSOL_STORAGE_PATH", ""),
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""),
        pin_options=not args.no_pin,
        workdir=str(Path.cwd()),
    )
    # Absolute paths: the job's working directory or node may differ from this one's.
    if entry.storage_path:
        entry.storage_path = str(Path(entry.storage_path).expanduser().resolve())
    if entry.tracking_uri:
        entry.tracking_uri = _absolute_sqlite(entry.tracking_uri)
    return entry


def default_folder(entry: EntryPoint) -> str:
    storage = entry.storage_path or str(Path.home() / "wsol_runs")
    return str(Path(storage) / "slurm_logs" / "%j")


def make_executor(args: argparse.Namespace, folder: str):
    job_name = args.job_name or f"wsol-{Path(args.script).stem}"
    setup = [f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}", *args.setup]
    if args.executor == "slurm":
        executor_class = ScriptOnlySlurmExecutor if args.dry_run else submitit.SlurmExecutor
        executor = executor_class(folder=folder, max_num_timeout=args.max_requeues)
        params = {
            "job_name": job_name,
            "nodes": args.nodes,
            "ntasks_per_node": 1,
            "cpus_per_task": args.cpus_per_node,
            "time": args.timeout_min,
            "signal_delay_s": args.signal_delay_s,
            "setup": setup,
            "partition": args.partition,
            "account": args.account,
            "qos": args.qos,
            "constraint": args.constraint,
            "mem": args.mem,
        }
        if args.gpus_per_node:
            params["gpus_per_node"] = args.gpus_per_node
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return executor
    if args.executor == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_requeues)
        executor.update_parameters(
            timeout_min=args.timeout_min,
            nodes=1,
            tasks_per_node=1,
            gpus_per_node=args.gpus_per_node,
            signal_delay_s=args.signal_delay_s,
            setup=setup,
        )
        return executor
    return submitit.DebugExecutor(folder=folder)


class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor for ``--dry-run``: it validates and holds the same parameters
    (:func:`sbatch_script` reads them) and needs no SLURM here, where submitit's own refuses to
    exist without ``srun`` on PATH; it never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _internal_process_submissions(self, delayed_submissions):
        raise RuntimeError("a --dry-run executor submits nothing")


def sbatch_script(executor) -> str:
    """The sbatch file submitit would write for ``job`` (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(
        command="python -u -m submitit.core._submit <folder>", folder=executor.folder, **executor.parameters
    )


def prepare(argv: list[str] | None):
    """Options -> ``(args, entry, executor, job)``, validated; raises :class:`UsageError`.

    ``executor`` and ``job`` are None for ``--executor direct``. Nothing is submitted.
    """
    args = parse_args(argv)
    validate(args)
    entry = make_entry(args)
    if not args.no_precheck and uses_shared_options(args.script):
        precheck_config(entry.args)
    if args.executor == "direct":
        return args, entry, None, None
    if args.executor == "slurm" and not args.dry_run:
        check_slurm(args.partition, args.nodes, args.cpus_per_node, args.gpus_per_node)
    folder = str(Path(args.folder).expanduser().resolve()) if args.folder else default_folder(entry)
    spec = ClusterSpec(
        cpus_per_node=args.cpus_per_node,
        gpus_per_node=args.gpus_per_node,
        port_base=args.ray_port_base,
        join_timeout_s=args.ray_join_timeout_s,
        include_dashboard=not args.no_ray_dashboard,
        temp_root=args.ray_temp_root,
        interface=args.ray_interface,
        rendezvous_root=str(Path(folder.split("%", 1)[0])),
    )
    # The job unpickles cluster.ray_on_slurm: the project root goes on the job's PYTHONPATH
    # (sbatch and submitit's local executor pass this environment on; the setup line repeats it).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return args, entry, make_executor(args, folder), RayOnSlurmJob(entry, spec)


def job_error_summary(err: BaseException) -> str:
    """One line out of submitit's failure (which embeds the job's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in reversed(lines):
        if "LaunchError:" in line:
            return line.split("LaunchError:", 1)[1].strip()
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt):", line):
            return line
    return lines[-1] if lines else repr(err)


def main(argv: list[str] | None = None) -> int:
    try:
        args, entry, executor, job_fn = prepare(argv)
    except UsageError as err:
        print(f"launch_slurm.py: error: {err}", file=sys.stderr)
        return 2
    if executor is None:
        return run_direct(entry)
    if args.dry_run:
        print(
            sbatch_script(executor)
            if args.executor == "slurm"
            else f"# {args.executor} executor, folder {executor.folder}"
        )
        print(f"# entry point: {shlex.join(entry.command())}")
        print(
            f"# run name: {entry.run_name or 'slurm-<job id>'}  storage: {entry.storage_path or '(the script default)'}  tracking: {entry.tracking_uri or '(the script default)'}"
        )
        return 0

    try:
        job = executor.submit(job_fn)
    except Exception as err:  # noqa: BLE001 - sbatch's message is the useful part
        lines = str(err).strip().splitlines()
        print(f"launch_slurm.py: error: submission failed: {lines[-1] if lines else err!r}", file=sys.stderr)
        return 1
    name = entry.run_name or default_run_name(job.job_id, args.executor)
    print(f"[launch] submitted job {job.job_id} ({args.executor}): {args.nodes} node(s), run {name!r}", flush=True)
    print(f"[launch] logs: {job.paths.stdout} (node 0), {job.paths.folder}/*_ray_node*.log", flush=True)
    if args.executor == "slurm":
        print(f"[launch] follow: tail -f {job.paths.stdout}    cancel: scancel {job.job_id}", flush=True)
        if not args.wait:
            return 0
    try:
        result = job.result()
    except Exception as err:  # noqa: BLE001 - the job's own traceback is in its log
        print(
            f"launch_slurm.py: error: job {job.job_id} failed: {job_error_summary(err)} (log: {job.paths.stderr})",
            file=sys.stderr,
        )
        return 1
    print(f"[launch] job {job.job_id} finished: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
