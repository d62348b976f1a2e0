"""Training state on disk: one ``state.pt`` per checkpoint directory, loaded with ``weights_only``.

Everything needed to continue bit-for-bit where a run stopped is saved: model, optimizer and
schedule state, the epoch, the best score so far, the RNG states of every generator the loop
uses, the resolved config and the MLflow run id (so a resumed run logs into the same run).
bf16 autocast needs no loss scaler, so there is none to save.

Only tensors, numbers, strings, lists and dicts are written, so ``torch.load(weights_only=True)``
reads the file without unpickling arbitrary objects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def capture_rng_states() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@dataclass
class TrainingState:
    epoch: int  # epochs completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    config: dict[str, Any]
    mlflow_run_id: str = ""
    best_score: float = -1.0
    rng: dict[str, Any] = field(default_factory=dict)
    # The Loc threshold chosen on val (index into np.arange(0, 1, cam_curve_interval)); the test
    # split and jobs/localize.py read boxes there. None before the first evaluation.
    loc_threshold_index: int | None = None
    cam_curve_interval: float = 0.001

    @property
    def loc_threshold(self) -> float | None:
        """Val's chosen CAM threshold as a value in [0, 1), or ``None``."""
        if self.loc_threshold_index is None:
            return None
        return float(np.arange(0, 1, self.cam_curve_interval)[self.loc_threshold_index])


def save_training_state(directory: str | Path, state: TrainingState) -> Path:
    path = Path(directory) / STATE_FILE
    payload = {"format_version": FORMAT_VERSION, **state.__dict__}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # never leave a half-written state behind
    return path


def load_training_state(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint directory {directory}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    version = payload.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, this code reads {FORMAT_VERSION}")
    return TrainingState(**payload)


def load_model_weights(source: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and config from a checkpoint directory or a ``state.pt`` file."""
    path = Path(source)
    state = load_training_state(path if path.is_dir() else path.parent, map_location)
    return state.model, state.config
