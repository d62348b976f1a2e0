"""How long a private local Ray instance takes to start beside CPU burners, through the same
``init_ray`` every entry point uses (one attempt, so that a failure shows as a failure).

    uv run python benchmarks/ray_start_load.py [--burners 0 10] [--starve] [--settle 30]
    # -> benchmarks/results/ray_start_load.json

``--burners N`` runs N busy loops beside the start (10 on a 2-core box: the load of about 10 at
which users saw "The current node timed out during startup"), started ``--settle`` seconds
before it so that the load average has risen. ``--starve`` adds a run with the start at nice 19
beside the burners: the job then gets almost no CPU, the worst a shared box does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START = """
import time
began = time.monotonic()
from wsol_core.train.ray_session import init_ray
init_ray()
print(f"STARTED {time.monotonic() - began:.1f}", flush=True)
"""


def one_start(burners: int, settle: float, nice: int, timeout: float) -> dict:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)]
    try:
        time.sleep(settle if burners else 0)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
            "WSOL_RAY_START_ATTEMPTS": "1",
            "PYTHONPATH": str(REPO),
        }
        began = time.monotonic()
        load_at_start = os.getloadavg()[0]
        try:
            done = subprocess.run(
                ["nice", "-n", str(nice), sys.executable, "-c", START],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            out, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = (exc.stdout or b"").decode() + (exc.stderr or b"").decode(), None
        seconds = time.monotonic() - began
    finally:
        for p in busy:
            p.kill()
            p.wait()
    started = [line for line in out.splitlines() if line.startswith("STARTED ")]
    error = next(
        (line for line in reversed(out.splitlines()) if line.startswith("error") or "RayStartError" in line), None
    )
    return {
        "burners": burners,
        "nice": nice,
        "load_at_start": round(load_at_start, 2),
        "load_at_end": round(os.getloadavg()[0], 2),
        "started": bool(started),
        "start_s": float(started[0].split()[1]) if started else None,
        "wall_s": round(seconds, 1),
        "exit_status": rc,
        "error": error[:400] if error else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, nargs="+", default=[0, 10])
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--starve", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    runs = [one_start(n, args.settle, 0, args.timeout) for n in args.burners]
    if args.starve:
        runs.append(one_start(max(args.burners) or 4, args.settle, 19, args.timeout))
    for run in runs:
        print(run, flush=True)
    result = {**payload_header("ray_start_load", argv), "runs": runs, "cores": os.cpu_count()}
    path = write_result("ray_start_load", result, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
