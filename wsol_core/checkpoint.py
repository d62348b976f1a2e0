"""Training state on disk: one ``state.pt`` per checkpoint directory, loaded with ``weights_only``.

Everything needed to continue bit-for-bit where a run stopped is saved: model, optimizer and
schedule state, the epoch, the best score so far, the RNG states of every generator the loop
uses, the resolved config and the MLflow run id (so a resumed run logs into the same run).
bf16 autocast needs no loss scaler, so there is none to save.

Only tensors, numbers, strings, lists and dicts are written, so ``torch.load(weights_only=True)``
reads the file without unpickling arbitrary objects.

**Damage.** ``state.pt`` is written under a temporary name, flushed to disk and renamed, then
``manifest.json`` beside it records its size and SHA-256, the epoch, the config's fingerprint and
the MLflow run id (written the same way, last). :func:`verify_checkpoint` checks all of that and
that the archive loads, and raises :class:`DamagedCheckpointError` naming the file and the reason:
the driver runs it before any worker starts and falls back to the newest good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


# What may change between a run and its resumption: where and how it executes (the run
# section: workers, storage, tracking, resume options) and how long it trains.
_RESUMABLE_CHANGES = ("run.", "train.epochs")


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    from wsol_core.config_fields import flatten_dict

    return {k: v for k, v in flatten_dict(config).items() if not k.startswith(_RESUMABLE_CHANGES)}


def config_fingerprint(config: dict[str, Any]) -> str:
    """SHA-256 of the resolved config without what a resumption may change (the ``run`` section
    and ``train.epochs``)."""
    return hashlib.sha256(json.dumps(_comparable(config), sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, flush to disk, then rename over ``path``: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def capture_rng_states() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    # legacy form (the default): ("MT19937", keys, pos, has_gauss, cached_gaussian)
    np_state = cast(tuple[Any, ...], np.random.get_state())
    states: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
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
    """``state.pt`` then ``manifest.json`` in ``directory``, each written atomically."""
    directory = Path(directory)
    path = directory / STATE_FILE
    payload = {"format_version": FORMAT_VERSION, **state.__dict__}
    _write_atomically(path, lambda tmp: torch.save(payload, tmp))
    manifest = {
        "format_version": FORMAT_VERSION,
        "file": STATE_FILE,
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
        "epoch": state.epoch,
        "config_fingerprint": config_fingerprint(state.config),
        "mlflow_run_id": state.mlflow_run_id,
    }
    _write_atomically(directory / MANIFEST_FILE, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return path


def _read_state(path: Path, map_location) -> dict[str, Any]:
    if not path.is_file():
        raise DamagedCheckpointError(path, "missing")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedCheckpointError(path, f"does not load with torch.load(weights_only=True): {reason}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise DamagedCheckpointError(path, f"not a training state of this project (found {type(payload).__name__})")
    return payload


def load_training_state(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in checkpoint directory {directory}")
    payload = _read_state(path, map_location)
    version = payload.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise DamagedCheckpointError(path, f"checkpoint format {version!r}, this code reads {FORMAT_VERSION}")
    try:
        return TrainingState(**payload)
    except TypeError as exc:
        raise DamagedCheckpointError(path, f"unexpected training-state fields ({exc})") from None


@dataclass
class CheckpointInfo:
    path: Path
    epoch: int
    mlflow_run_id: str
    config_fingerprint: str
    loc_threshold: float | None = None


def verify_checkpoint(
    directory: str | Path,
    *,
    config: dict[str, Any] | None = None,
    mlflow_run_id: str | None = None,
    read_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> CheckpointInfo:
    """Check one checkpoint directory before resuming from it.

    The manifest's size and SHA-256 must match ``state.pt`` (a checkpoint written before
    manifests existed is checked by loading alone), the archive must load weights-only, and, when
    given, the config (fingerprint, ``run`` section aside) and the MLflow run id must match.
    ``read_config`` reads both configs through today's schema first (the training layer passes
    :func:`wsol_core.config.read_through_schema`: a field added since the checkpoint was written
    takes its default, so an upgrade does not orphan a run); this module knows no schema.

    Raises:
        DamagedCheckpointError: naming the file and what is wrong.
    """
    directory = Path(directory)
    path = directory / STATE_FILE
    manifest_path = directory / MANIFEST_FILE
    if not path.is_file():
        raise DamagedCheckpointError(path, "missing (an interrupted save?)")
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise DamagedCheckpointError(manifest_path, f"unreadable ({exc})") from None
        size = path.stat().st_size
        if size != manifest.get("size"):
            raise DamagedCheckpointError(
                path, f"{size} bytes, its manifest says {manifest.get('size')} (truncated or overwritten)"
            )
        if file_sha256(path) != manifest.get("sha256"):
            raise DamagedCheckpointError(path, "SHA-256 differs from its manifest (corrupted)")
    state = load_training_state(directory)
    read = read_config or (lambda written: written)
    stored = read(state.config)
    fingerprint = config_fingerprint(stored)
    if config is not None and fingerprint != config_fingerprint(read(config)):
        theirs, ours = _comparable(stored), _comparable(read(config))
        differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in differing[:5])
        raise DamagedCheckpointError(
            path, f"was written with another config ({shown}); pass --no-resume or a new --name"
        )
    if mlflow_run_id is not None and state.mlflow_run_id and state.mlflow_run_id != mlflow_run_id:
        raise DamagedCheckpointError(path, f"belongs to MLflow run {state.mlflow_run_id}, not {mlflow_run_id}")
    return CheckpointInfo(directory, state.epoch, state.mlflow_run_id, fingerprint, state.loc_threshold)


def load_model_weights(
    source: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and config from a checkpoint directory or a ``state.pt`` file."""
    path = Path(source)
    state = load_training_state(path if path.is_dir() else path.parent, map_location)
    return state.model, state.config
