"""What every benchmark records beside its figures: the machine and the software."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: str = "cpu") -> dict:
    import torch

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model,
        "cpu_cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def payload_header(benchmark: str, argv: list[str] | None, device: str = "cpu") -> dict:
    """The fields every result opens with: the benchmark's name (its file under benchmarks/), the
    command that reproduces it, quoted so that it can be pasted back into a shell, and the machine
    with its load at the time of writing (timings on a shared box mean little without it)."""
    args = list(argv if argv is not None else sys.argv[1:])
    return {
        "benchmark": benchmark,
        "command": shlex.join(["uv", "run", "python", f"benchmarks/{benchmark}.py", *args]),
        "machine": {**machine_info(device), "load_average": [round(x, 2) for x in os.getloadavg()]},
    }


def write_result(name: str, payload: dict, out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def random_checkpoint(directory: Path, overrides: list[str], num_classes: int, threshold: float) -> Path:
    """A training checkpoint of random weights (speed does not depend on them) built from
    ``overrides``, with ``threshold`` stored as its val choice, in ``directory``."""
    from wsol_core.checkpoint import TrainingState, save_training_state
    from wsol_core.config import load_config, to_dict
    from wsol_core.methods import build_method

    cfg = load_config(overrides=[*overrides, "model.pretrained=null"])
    directory.mkdir(parents=True, exist_ok=True)
    save_training_state(
        directory,
        TrainingState(
            epoch=1,
            model=build_method(cfg, num_classes).state_dict(),
            optimizer={},
            scheduler={},
            config=to_dict(cfg),
            loc_threshold_index=round(threshold / 0.001),
            cam_curve_interval=0.001,
        ),
    )
    return directory
