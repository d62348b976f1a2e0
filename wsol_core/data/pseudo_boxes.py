"""Pseudo boxes: one box per sample key of a split, the first stage's output in C2AM Sec. 3.4.

C2AM's WSOL numbers come from two stages: class-agnostic boxes extracted from the activation maps
over the training split, then a box regressor trained on them (seed 004, Sec. 3.4; PSOL's
design). This module is the file format between the two stages and its checks; the extraction
job and the regressor read and write it through here.

A sidecar is a folder beside (never inside) the split's shards:

- ``pseudo_boxes.json``, the header: the format name, the split it describes (its name, the
  SHA-256 of its ``dataset.json`` and its sample count), where the boxes came from (checkpoint,
  method, which map), and the threshold rule and value.
- ``boxes-rank<r>-of-<w>.jsonl``: one line per sample, ``{"key", "box": [x0, y0, x1, y1],
  "width", "height"}``: the box in the original image's pixels with inclusive corners (the
  protocol's convention, as GT boxes are stored), and the image size. Each rank appends its own
  file and flushes after every batch, so an interrupted extraction resumes by skipping the keys
  already written.

:func:`verify_sidecar` refuses, naming the sidecar and what differs, a sidecar written for
another version of the split (manifest SHA-256), one with a different count, or one whose keys
are not the split's keys; :func:`quality` scores pseudo boxes against the GT boxes (CorLoc at IoU
0.5, mean best IoU).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsol_core.data.format import sha256_file
from wsol_core.data.manifest import MANIFEST_NAME, load_manifest
from wsol_core.metrics.reference import reference_iou

FORMAT = "wsol-pseudo-boxes/1"
HEADER = "pseudo_boxes.json"
SUMMARY = "summary.json"  # the finished extraction's merged counts; ``skipped``: corrupt samples left without a box
CORLOC_IOU = 0.5  # a box is correct at IoU >= 0.5 with some GT box (CorLoc, as C2AM reports it)


class SidecarError(ValueError):
    """A pseudo-box sidecar that cannot be used as it is; the message names it and what is wrong."""


@dataclass(frozen=True)
class PseudoBox:
    key: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in original pixels, inclusive
    width: int
    height: int

    def to_line(self) -> str:
        return json.dumps({"key": self.key, "box": list(self.box), "width": self.width, "height": self.height}) + "\n"

    @classmethod
    def from_line(cls, line: str, where: str) -> PseudoBox:
        try:
            doc = json.loads(line)
            x0, y0, x1, y1 = (int(v) for v in doc["box"])
            box = cls(str(doc["key"]), (x0, y0, x1, y1), int(doc["width"]), int(doc["height"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SidecarError(f"{where}: not a pseudo-box line ({type(exc).__name__}: {exc})") from None
        if not (0 <= x0 <= x1 < box.width and 0 <= y0 <= y1 < box.height):
            raise SidecarError(
                f"{where}: box {list(box.box)} of {box.key!r} is not inside its {box.width}x{box.height} image"
            )
        return box


@dataclass
class SidecarHeader:
    split: str
    split_manifest_sha256: str
    num_samples: int
    threshold_rule: str  # "best_val" (the checkpoint's val choice) or "fixed"
    threshold: float
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, method, map kind
    format: str = FORMAT


def manifest_sha256(split_dir: str | Path) -> str:
    """The identity of a split: the SHA-256 of its ``dataset.json`` (which lists every tar's SHA-256)."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise SidecarError(f"{split_dir}: no {MANIFEST_NAME}; not a split written by jobs/make_shards.py")
    return sha256_file(path)


def new_header(
    split_dir: str | Path, threshold_rule: str, threshold: float, source: Mapping[str, Any]
) -> SidecarHeader:
    if threshold_rule not in ("best_val", "fixed"):
        raise SidecarError(f"threshold rule {threshold_rule!r} is not 'best_val' or 'fixed'")
    if not 0.0 <= threshold < 1.0:
        raise SidecarError(f"threshold {threshold} must be in [0, 1)")
    identity = manifest_sha256(split_dir)  # first: names a folder that is not a split
    manifest = load_manifest(split_dir)
    return SidecarHeader(manifest.split, identity, manifest.num_samples, threshold_rule, float(threshold), dict(source))


def write_header(out: str | Path, header: SidecarHeader) -> Path:
    """Write ``header``, or check it against the one already there (a resumed extraction must
    describe the same split with the same rule)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / HEADER
    if path.is_file():
        existing = read_header(out)
        mine, theirs = asdict(header), asdict(existing)
        differs = sorted(k for k in mine if k != "source" and mine[k] != theirs[k])
        if differs:
            raise SidecarError(
                f"{out}: holds pseudo boxes of another extraction ({', '.join(f'{k}: {theirs[k]!r}' for k in differs)}); "
                "choose another output folder or delete it"
            )
        return path
    path.write_text(json.dumps(asdict(header), indent=2, sort_keys=True) + "\n")
    return path


def read_header(out: str | Path) -> SidecarHeader:
    path = Path(out) / HEADER
    if not path.is_file():
        raise SidecarError(f"{out}: no {HEADER}; not a pseudo-box sidecar")
    try:
        doc = json.loads(path.read_text())
        header = SidecarHeader(**doc)
    except (ValueError, TypeError) as exc:
        raise SidecarError(f"{path}: not a pseudo-box header ({exc})") from None
    if header.format != FORMAT:
        raise SidecarError(f"{path}: format {header.format!r} is not {FORMAT!r}")
    return header


class SidecarWriter:
    """One rank's box file, appended and flushed per batch; :attr:`done` holds the keys already
    in it (from an interrupted run), which the extraction skips."""

    def __init__(self, out: str | Path, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(out) / f"boxes-rank{rank}-of-{world_size}.jsonl"
        self.done: set[str] = set()
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):  # a run killed mid-line: cut the torn line off
                self.path.write_text(text[: text.rfind("\n") + 1])
            self.done = {b.key for b in _read_lines(self.path)}
        self._file = self.path.open("a")

    def add(self, boxes: Iterable[PseudoBox]) -> int:
        written = 0
        for box in boxes:
            if box.key not in self.done:
                self._file.write(box.to_line())
                self.done.add(box.key)
                written += 1
        self._file.flush()
        return written

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SidecarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_lines(path: Path) -> list[PseudoBox]:
    text = path.read_text()
    lines = text.splitlines()
    # A run killed mid-write leaves at most one torn last line: not a box yet (its writer cuts
    # it off and writes that sample again on resume).
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    return [PseudoBox.from_line(line, f"{path}:{n + 1}") for n, line in enumerate(lines) if line.strip()]


def read_boxes(out: str | Path) -> dict[str, PseudoBox]:
    """Every rank's boxes, by key. A key written twice with different boxes is an error."""
    boxes: dict[str, PseudoBox] = {}
    for path in sorted(Path(out).glob("boxes-rank*-of-*.jsonl")):
        for box in _read_lines(path):
            if box.key in boxes and boxes[box.key] != box:
                raise SidecarError(
                    f"{path}: key {box.key!r} has two different boxes ({list(boxes[box.key].box)} and {list(box.box)})"
                )
            boxes[box.key] = box
    return boxes


def recorded_skips(out: str | Path) -> int:
    """The corrupt samples a finished extraction skipped (from its ``summary.json``; 0 without one)."""
    path = Path(out) / SUMMARY
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text())["skipped"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SidecarError(f"{path}: not an extraction summary ({type(exc).__name__}: {exc})") from None


def verify_sidecar(
    out: str | Path,
    split_dir: str | Path,
    keys: Sequence[str] | None = None,
    boxes: Mapping[str, PseudoBox] | None = None,
) -> SidecarHeader:
    """Check that the sidecar in ``out`` describes the split in ``split_dir`` as it is now: same
    ``dataset.json`` (SHA-256), same count, and (given the split's ``keys``) the same keys;
    ``boxes``: the sidecar's boxes when the caller has read them already. Samples
    the extraction skipped as corrupt (its ``summary.json``) are the only keys allowed to lack a box."""
    header = read_header(out)
    actual = manifest_sha256(split_dir)
    if header.split_manifest_sha256 != actual:
        raise SidecarError(
            f"{out}: written for a split whose {MANIFEST_NAME} has SHA-256 {header.split_manifest_sha256[:16]}..., "
            f"but {split_dir}/{MANIFEST_NAME} has {actual[:16]}...: the shards changed since; extract the boxes again"
        )
    boxes = read_boxes(out) if boxes is None else boxes  # a caller that reads them anyway passes them
    skipped = recorded_skips(out)
    if len(boxes) + skipped != header.num_samples:
        raise SidecarError(
            f"{out}: {len(boxes)} boxes and {skipped} skipped samples for the split's {header.num_samples} samples "
            "(an unfinished extraction?)"
        )
    if keys is not None:
        missing = sorted(set(keys) - set(boxes))
        extra = sorted(set(boxes) - set(keys))
        if len(missing) != skipped or extra:
            raise SidecarError(
                f"{out}: keys differ from {split_dir}'s: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(extra)} not in the split (e.g. {extra[:3]})"
            )
    return header


def quality(boxes: Mapping[str, PseudoBox], gt: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Pseudo boxes against GT boxes (``[K, 4]`` inclusive original pixels per key), over the keys
    that have both: ``corloc`` (percent with IoU >= 0.5 against some GT box), ``mean_iou``
    (mean over images of the best IoU, percent) and ``images``."""
    best = []
    for key, box in boxes.items():
        truth = np.asarray(gt.get(key, np.zeros((0, 4))), dtype=np.int64).reshape(-1, 4)
        if len(truth):
            best.append(float(reference_iou(np.asarray([box.box]), truth).max()))
    if not best:
        return {"corloc": float("nan"), "mean_iou": float("nan"), "images": 0.0}
    values = np.asarray(best)
    return {
        "corloc": float(100.0 * np.mean(values >= CORLOC_IOU)),
        "mean_iou": float(100.0 * values.mean()),
        "images": float(len(values)),
    }
