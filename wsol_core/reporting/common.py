"""What the run summary and the ablation tables share: metric names and lookup, the methods'
switch labels, number formatting and markdown tables."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LOC_KEYS = (
    "maxboxacc_v2",
    "boxacc_v2_iou30",
    "boxacc_v2_iou50",
    "boxacc_v2_iou70",
    "maxboxacc_v1",
    "gt_known_loc",
    "top1_loc",
    "pxap",
)
# Runs logged before the names were made unconfusable stored the V2 components as maxboxacc_<IoU>
# (and their GT-known / Top-k Loc came from every contour, not the published single box).
LEGACY_NAMES = {f"boxacc_v2_iou{d}": f"maxboxacc_{d}" for d in (30, 50, 70)}
SWITCH_RE = re.compile(r"^method\.([A-Za-z0-9_]+)\.enabled$")


@functools.cache
def _switch_labels() -> dict[str, str]:
    """``{part: label}`` in the papers' column order, as each method's config declares it."""
    from wsol_core.methods import switch_labels

    return switch_labels()


def truthy(value: Any) -> bool:
    """Config booleans as MLflow stores them (``"True"``) or as Python has them."""
    if isinstance(value, str):
        return value.strip().lower() in {"true", "1", "yes", "on"}
    return bool(value)


def switch_name(key: str) -> str:
    return _switch_labels().get(key, key.upper().replace("_", "-"))


def switch_rank(key: str) -> tuple[int, str]:
    order = list(_switch_labels())
    return (order.index(key) if key in order else len(order), key)


def method_switches(params: Mapping[str, Any]) -> dict[str, bool]:
    """``{"srd": True, "cg": False, "pnl": True}`` from ``method.<part>.enabled`` params, in the
    papers' order (SRD, CG, PNL, ...; unknown parts after, alphabetically)."""
    found = {}
    for key, value in params.items():
        match = SWITCH_RE.match(key)
        if match:
            found[match.group(1)] = truthy(value)
    return {key: found[key] for key in sorted(found, key=switch_rank)}


def metric(metrics: Mapping[str, float], name: str, split: str | None = None) -> float | None:
    """``metrics["<split>/<name>"]``, else ``metrics[name]``; ``None`` when absent or NaN.

    Runs logged under the earlier names (:data:`LEGACY_NAMES`) are read too."""
    names = [name] + ([LEGACY_NAMES[name]] if name in LEGACY_NAMES else [])
    for key in [f"{split}/{n}" for n in names if split] + names:
        if key in metrics and metrics[key] is not None:
            value = float(metrics[key])
            return None if math.isnan(value) else value
    return None


def pick_split(metrics: Mapping[str, float], preferred: Sequence[str] = ("test", "val")) -> str | None:
    """The first split with a MaxBoxAccV2 (or, on mask-only data, a PxAP) in ``metrics``
    (``None``: unprefixed keys)."""
    for split in preferred:
        if f"{split}/maxboxacc_v2" in metrics or f"{split}/pxap" in metrics:
            return split
    return None


def fmt(value: float | None, std: float | None = None, digits: int = 2) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if std is not None:
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)
