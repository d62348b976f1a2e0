"""A tiny entry point that checks a Ray cluster before a long job is sent to it.

    uv run python cluster/launch_slurm.py --nodes 2 --time 10 -- cluster/ray_smoke.py

Connects to ``$RAY_ADDRESS`` (a local Ray when unset), runs one task per CPU, prints the nodes,
their resources and where the tasks ran, and writes the same as JSON with ``--out FILE``.
``--sleep S`` keeps the driver busy (``--first-attempt-only``: only before the first requeue, to
try preemption and requeueing); ``--fail`` exits 3. Ctrl-C (SIGINT) is recorded as "interrupted".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="", help="write the summary as JSON here")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to stay connected after the check")
    parser.add_argument(
        "--first-attempt-only", action="store_true", help="sleep only if SLURM_RESTART_COUNT is 0 or unset"
    )
    parser.add_argument("--fail", action="store_true", help="exit with code 3 after the check")
    parser.add_argument("--name", default="", help="run name (recorded; the launcher pins it)")
    parser.add_argument("--storage-path", default="", help="recorded")
    parser.add_argument("--tracking-uri", default="", help="recorded")
    args = parser.parse_args(argv)

    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def where() -> str:
        return socket.gethostname()

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    hosts = sorted(set(ray.get([where.remote() for _ in range(max(cpus, 1))])))
    summary = {
        "ray_address": os.environ.get("RAY_ADDRESS", ""),
        "auth_mode": os.environ.get("RAY_AUTH_MODE", ""),
        "num_nodes": len(nodes),
        "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
        "task_hosts": hosts,
        "name": args.name,
        "storage_path": args.storage_path,
        "tracking_uri": args.tracking_uri,
        "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }
    print(f"[ray_smoke] {json.dumps(summary)}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if args.sleep and not (args.first_attempt_only and restart > 0):
        try:
            time.sleep(args.sleep)
        except KeyboardInterrupt:
            print("[ray_smoke] interrupted", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({"interrupted": True, "name": args.name, "restart": str(restart)}) + "\n")
            ray.shutdown()
            return 130
    ray.shutdown()
    return 3 if args.fail else 0


if __name__ == "__main__":
    sys.exit(main())
