"""Ablation tables: runs grouped by configuration (several seeds of one configuration become one
row with mean and standard deviation), labelled from the method's on/off switches
(``method.srd.enabled`` ...), in the papers' layout: MaxBoxAccV2 at IoU 0.3 / 0.5 / 0.7, their
mean, and Top-1 Loc. Written as markdown and CSV.

The table is computed on a pandas frame in the layout of ``mlflow.search_runs`` (``run_id``,
``status``, ``params.*``, ``metrics.*``, ``tags.*``): :func:`build_ablation_table` takes either
such a frame (``build_ablation_table(mlflow.search_runs(experiment_names=[...]))``) or
:class:`RunRecord` objects, which :func:`runs_frame` turns into one; each configuration's mean,
sample standard deviation and count are one ``groupby`` of it."""

from __future__ import annotations

import csv
import fnmatch
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from wsol_core.reporting.anchors import FMCG_TABLE1, SOURCES
from wsol_core.reporting.common import (
    SWITCH_RE,
    fmt,
    markdown_table,
    method_switches,
    metric,
    switch_name,
    switch_rank,
    truthy,
)


@dataclass
class RunRecord:
    """What the ablation table needs of one MLflow run (params as MLflow stores them: strings)."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    name: str = ""
    status: str = "FINISHED"

    @classmethod
    def from_mlflow(cls, run) -> RunRecord:
        return cls(
            run_id=run.info.run_id,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
            name=run.info.run_name or "",
            status=run.info.status,
        )

    @property
    def synthetic(self) -> bool:
        if "wsol.synthetic" in self.tags:
            return truthy(self.tags["wsol.synthetic"])
        if "data.root" in self.params:
            return self.params["data.root"] in ("", "None")
        return False


# Params that do not change what a run measures: runs that differ only here are repeats (seeds).
DEFAULT_GROUP_IGNORE: tuple[str, ...] = (
    "train.seed",
    "run.*",
    "data.resolved_root",
    "data.synthetic.cache_dir",
    "data.loader",
    "data.num_threads",
    "eval.batch_size",
    "eval.num_vis_images",
    "train.compile",
    "train.keep_best",
)
ABLATION_COLUMNS = ("boxacc_v2_iou30", "boxacc_v2_iou50", "boxacc_v2_iou70", "maxboxacc_v2", "top1_loc")
COLUMN_TITLES = {
    "boxacc_v2_iou30": "IoU 0.3",
    "boxacc_v2_iou50": "IoU 0.5",
    "boxacc_v2_iou70": "IoU 0.7",
    "maxboxacc_v1": "MaxBoxAcc (v1)",
    "pxap": "PxAP",
    "maxboxacc_v2": "Mean (MaxBoxAccV2)",
    "top1_loc": "Top-1 Loc",
    "gt_known_loc": "GT-known Loc",
    "top5_loc": "Top-5 Loc",
    "top1_acc": "Top-1 Acc",
    "corloc": "CorLoc",
}


@dataclass
class AblationRow:
    label: str
    method: str
    switches: dict[str, bool]
    run_ids: list[str]
    seeds: list[str]
    mean: dict[str, float | None]
    std: dict[str, float | None]
    count: dict[str, int]
    params: dict[str, str]
    synthetic: bool
    delta_vs_full: float | None = None

    @property
    def n(self) -> int:
        return len(self.run_ids)


@dataclass
class AblationTable:
    rows: list[AblationRow]
    columns: tuple[str, ...]
    split: str
    switch_keys: list[str]
    synthetic: bool
    skipped: list[str] = field(default_factory=list)  # "run_id: reason"


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def group_key(
    params: Mapping[str, str], group_by: Sequence[str] | None = None, ignore: Sequence[str] = DEFAULT_GROUP_IGNORE
) -> tuple:
    """Runs with equal keys are repeats of one configuration. ``group_by`` (fnmatch patterns)
    restricts the key to those params; otherwise every param not matching ``ignore`` counts."""
    if group_by:
        items = {k: v for k, v in params.items() if any(fnmatch.fnmatchcase(k, p) for p in group_by)}
        for pattern in group_by:  # a named param absent from a run still separates it
            if not any(ch in pattern for ch in "*?[") and pattern not in items:
                items[pattern] = "<unset>"
    else:
        items = {k: v for k, v in params.items() if not _ignored(k, ignore)}
    return tuple(sorted((k, str(v)) for k, v in items.items()))


def switch_label(method: str, switches: Mapping[str, bool], keys: Sequence[str] | None = None) -> str:
    """``FMCG (full)``, ``FMCG w/o CG``, ``FMCG w/o SRD, CG, PNL``; ``CAM`` for a method without switches."""
    name = (method or "?").upper()
    keys = [k for k in (keys or switches) if k in switches]
    if not keys:
        return name
    off = [switch_name(k) for k in keys if not switches[k]]
    return f"{name} (full)" if not off else f"{name} w/o {', '.join(off)}"


_TEMPLATE_RE = re.compile(r"\{([^{}]+)\}")


def template_label(template: str, params: Mapping[str, str]) -> str:
    """``"{method.name} theta={method.srd.theta_drop}"`` filled from a run's params."""
    return _TEMPLATE_RE.sub(lambda m: str(params.get(m.group(1), "?")), template)


def runs_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """``records`` as ``mlflow.search_runs`` returns runs: one row each, ``run_id``, ``status``,
    ``params.<key>`` (strings), ``metrics.<key>`` (floats) and ``tags.<key>``."""
    rows = [
        {
            "run_id": r.run_id,
            "status": r.status,
            **{f"params.{k}": v for k, v in r.params.items()},
            **{f"metrics.{k}": float(v) for k, v in r.metrics.items()},
            **{f"tags.{k}": v for k, v in r.tags.items()},
            **({"tags.mlflow.runName": r.name} if r.name else {}),
        }
        for r in records
    ]
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "status"])


def records_from_frame(frame: pd.DataFrame) -> list[RunRecord]:
    """The runs of a ``mlflow.search_runs`` frame (missing values dropped per run)."""

    def present(value) -> bool:
        return value is not None and not (isinstance(value, float) and pd.isna(value))

    records = []
    for row in frame.to_dict("records"):
        section = {
            prefix: {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix) and present(v)}
            for prefix in ("params.", "metrics.", "tags.")
        }
        tags = {k: str(v) for k, v in section["tags."].items()}
        records.append(
            RunRecord(
                run_id=str(row["run_id"]),
                params={k: str(v) for k, v in section["params."].items()},
                metrics={k: float(v) for k, v in section["metrics."].items()},
                tags=tags,
                name=tags.get("mlflow.runName", ""),
                status=str(row.get("status", "FINISHED")),
            )
        )
    return records


def _column_statistics(groups: list[list[RunRecord]], columns: Sequence[str], split: str) -> pd.DataFrame:
    """Per group (the frame's index) and column: ``mean``, ``std`` (sample, NaN for one run) and
    ``count`` of the runs that have the value."""
    values = pd.DataFrame(
        [
            {"group": g, **{c: _run_value(r, c, split) for c in columns}}
            for g, members in enumerate(groups)
            for r in members
        ],
        columns=["group", *columns],
    )
    values[list(columns)] = values[list(columns)].astype(float)
    return values.groupby("group")[list(columns)].agg(["mean", "std", "count"])


def _value(stats: pd.DataFrame, group: int, column: str, statistic: str) -> float | None:
    value = stats.at[group, (column, statistic)]
    return None if pd.isna(value) else float(value)


def _run_value(record: RunRecord, column: str, split: str) -> float | None:
    value = metric(record.metrics, column, split)
    if value is None and column == "maxboxacc_v2":
        parts = [metric(record.metrics, f"boxacc_v2_iou{d}", split) for d in (30, 50, 70)]
        present = [p for p in parts if p is not None]
        if len(present) == len(parts):
            value = sum(present) / 3
    return value


def build_ablation_table(
    runs: Sequence[RunRecord] | pd.DataFrame,
    split: str = "test",
    columns: Sequence[str] = ABLATION_COLUMNS,
    group_by: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_GROUP_IGNORE,
    switch_keys: Sequence[str] | None = None,
    label_template: str = "",
) -> AblationTable:
    """Group the runs (a ``mlflow.search_runs`` frame or :class:`RunRecord` objects) by configuration and aggregate each column (mean, sample std, count).

    Rows are labelled from the method's switches (or ``label_template``); labels shared by
    different configurations get the differing params appended. Rows are ordered as in the
    papers' ablations: methods without switches, then each method's all-off baseline, its full
    configuration, and the configurations with one, two ... components off.
    """
    records = records_from_frame(runs) if hasattr(runs, "to_dict") and hasattr(runs, "columns") else list(runs)
    skipped, usable = [], []
    for record in records:
        if record.tags.get("wsol.report"):
            skipped.append(f"{record.run_id}: a report run")
        elif all(_run_value(record, c, split) is None for c in columns):
            skipped.append(f"{record.run_id}: no {split}/ metrics among {', '.join(columns)}")
        else:
            usable.append(record)

    groups: dict[tuple, list[RunRecord]] = {}
    for record in usable:
        groups.setdefault(group_key(record.params, group_by, ignore), []).append(record)

    all_switches = sorted({k for r in usable for k in method_switches(r.params)}, key=switch_rank)
    keys = [k for k in (switch_keys or all_switches)]
    rows: list[AblationRow] = []
    stats = _column_statistics(list(groups.values()), columns, split)
    for index, members in enumerate(groups.values()):
        first = members[0]
        method = first.params.get("method.name", "?")
        switches = method_switches(first.params)
        mean = {c: _value(stats, index, c, "mean") for c in columns}
        std = {c: _value(stats, index, c, "std") for c in columns}
        count = {c: int(stats.at[index, (c, "count")]) for c in columns}
        label = template_label(label_template, first.params) if label_template else switch_label(method, switches, keys)
        rows.append(
            AblationRow(
                label=label,
                method=method,
                switches={k: switches[k] for k in keys if k in switches},
                run_ids=[r.run_id for r in members],
                seeds=[r.params.get("train.seed", "?") for r in members],
                mean=mean,
                std=std,
                count=count,
                params=dict(first.params),
                synthetic=any(r.synthetic for r in members),
            )
        )

    _disambiguate(rows, group_by, ignore)

    def order(row: AblationRow) -> tuple:
        off = [k for k, v in row.switches.items() if not v]
        has = bool(row.switches)
        all_off = has and len(off) == len(row.switches)
        return (has, row.method, 0 if all_off else 1, len(off), [keys.index(k) for k in off if k in keys], row.label)

    rows.sort(key=order)

    def params_apart(a: AblationRow, b: AblationRow) -> int:
        keys = {k for k in a.params.keys() | b.params.keys() if not _ignored(k, ignore) and not SWITCH_RE.match(k)}
        return sum(a.params.get(k) != b.params.get(k) for k in keys)

    for row in rows:
        full = [r for r in rows if r.method == row.method and r.switches and all(r.switches.values())]
        # With several full configurations (the paper's settings, a searched one), an ablated row
        # is compared with the one it differs from only by its switches: the nearest in params.
        nearest = min(full, key=lambda r: params_apart(row, r), default=None)
        own = row.mean.get("maxboxacc_v2") if "maxboxacc_v2" in columns else None
        reference = nearest.mean.get("maxboxacc_v2") if nearest else None
        if own is not None and reference is not None:
            row.delta_vs_full = own - reference
    return AblationTable(
        rows=rows,
        columns=tuple(columns),
        split=split,
        switch_keys=keys,
        synthetic=any(r.synthetic for r in rows),
        skipped=skipped,
    )


def _disambiguate(rows: list[AblationRow], group_by: Sequence[str] | None, ignore: Sequence[str]) -> None:
    by_label: dict[str, list[AblationRow]] = {}
    for row in rows:
        by_label.setdefault(row.label, []).append(row)
    for same in by_label.values():
        if len(same) < 2:
            continue
        # The grouping keys name the rows best (a sweep's variant names); else the differing params.
        differing = [k for k in group_by or () if len({r.params.get(k, "<unset>") for r in same}) > 1]
        if not differing:
            keys = sorted({k for r in same for k in r.params if not _ignored(k, ignore)})
            differing = [k for k in keys if len({r.params.get(k, "<unset>") for r in same}) > 1]
        for row in same:
            shown = ", ".join(f"{k}={row.params.get(k, '<unset>')}" for k in differing[:3])
            row.label = f"{row.label} [{shown}{', ...' if len(differing) > 3 else ''}]"


def ablation_markdown(table: AblationTable, title: str = "Ablation", paper_reference: bool = True) -> str:
    """The papers' table: switches as check marks, MaxBoxAccV2 per IoU and mean, Top-1 Loc."""
    header = (
        ["Method"]
        + [switch_name(k) for k in table.switch_keys]
        + ["n"]
        + [COLUMN_TITLES.get(c, c) for c in table.columns]
    )
    header.append("Δ Mean vs full")
    body = []
    for row in table.rows:
        marks = ["✓" if row.switches.get(k) else ("✗" if k in row.switches else "") for k in table.switch_keys]
        cells = [fmt(row.mean[c], row.std[c]) for c in table.columns]
        body.append(
            [row.label, *marks, str(row.n), *cells, "–" if row.delta_vs_full is None else f"{row.delta_vs_full:+.2f}"]
        )
    align = ["l"] + ["c"] * len(table.switch_keys) + ["r"] * (len(header) - 1 - len(table.switch_keys))
    lines = [f"# {title}", ""]
    lines.append(
        f"Split `{table.split}`; values in percent, mean ± sample standard deviation over the n runs of a configuration "
        "(no ± for a single run). MaxBoxAccV2 is the mean over IoU 0.3 / 0.5 / 0.7 (Choe et al., CVPR 2020)."
    )
    lines.append("")
    if table.synthetic:
        lines += [
            "> **Synthetic data**: these runs use the generated benchmark; they cannot be compared with the papers' numbers.",
            "",
        ]
    lines += [markdown_table(header, body, align), ""]
    lines += ["Runs per row:", ""]
    lines += [
        f"- {row.label}: {', '.join(f'`{rid}` (seed {s})' for rid, s in zip(row.run_ids, row.seeds))}"
        for row in table.rows
    ]
    lines.append("")
    if table.skipped:
        lines += ["Skipped runs:", ""] + [f"- {s}" for s in table.skipped] + [""]
    if paper_reference and any(r.method == "fmcg" for r in table.rows):
        lines += [
            "## Published reference: FMCG Table 1 (VGG16, CUB-200-2011)"
            + (" (not comparable with the synthetic runs above)" if table.synthetic else ""),
            "",
        ]
        ref_header = ["Method", "SRD", "CG", "PNL", "IoU 0.3", "IoU 0.5", "IoU 0.7", "Mean (MaxBoxAccV2)", "Top-1 Loc"]
        ref_rows = [
            [label, *("✓" if s[k] else "✗" for k in ("srd", "cg", "pnl")), *(f"{v:.2f}" for v in values)]
            for label, s, values in FMCG_TABLE1
        ]
        lines += [
            markdown_table(ref_header, ref_rows, ["l", "c", "c", "c"] + ["r"] * 5),
            "",
            f"Source: {SOURCES['fmcg_t1']}.",
            "",
        ]
    return "\n".join(lines)


def ablation_csv(table: AblationTable) -> str:
    """One line per row: label, method, switches, n, run ids, seeds, then mean / std / count per column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [
        "label",
        "method",
        *(f"{k}_enabled" for k in table.switch_keys),
        "n",
        "split",
        "synthetic",
        "run_ids",
        "seeds",
    ]
    for column in table.columns:
        header += [f"{column}_mean", f"{column}_std", f"{column}_n"]
    header.append("delta_maxboxacc_v2_vs_full")
    writer.writerow(header)

    def num(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    for row in table.rows:
        line: list[str | int] = [
            row.label,
            row.method,
            *(("" if k not in row.switches else str(row.switches[k]).lower()) for k in table.switch_keys),
        ]
        line += [row.n, table.split, str(row.synthetic).lower(), ";".join(row.run_ids), ";".join(row.seeds)]
        for column in table.columns:
            line += [num(row.mean[column]), num(row.std[column]), row.count[column]]
        line.append(num(row.delta_vs_full))
        writer.writerow(line)
    return out.getvalue()
