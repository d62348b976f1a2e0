"""The run summary: a run's MaxBoxAccV2, GT-known Loc and Top-1 Loc beside the published
numbers for the same backbone and dataset (:data:`~wsol_core.reporting.anchors.ANCHORS`, each with
its citation), logged as ``summary.md`` / ``summary.html`` / ``summary.json`` and as the run's
description, which MLflow renders on the run page. Runs on the synthetic benchmark (or on a
backbone / dataset with no published numbers) are marked as not comparable, and the published rows
are shown for orientation only."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from wsol_core.reporting.anchors import PROTOCOL_INTERVAL, SOURCES, Anchor, normalize_dataset, select_anchors
from wsol_core.reporting.common import LOC_KEYS, fmt, markdown_table, method_switches, metric, pick_split, switch_name

if TYPE_CHECKING:  # pragma: no cover
    from wsol_core.tracking import RunLogger


@dataclass
class RunSummary:
    method: str
    backbone: str
    dataset: str
    synthetic: bool
    split: str | None
    run: dict[str, float | None]  # LOC_KEYS plus top1_acc / top5_loc / corloc when present
    anchors: list[Anchor]
    anchors_match: bool
    comparable: bool
    switches: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["anchors"] = [{**asdict(a), "citation": SOURCES[a.source]} for a in self.anchors]
        return data


def build_run_summary(
    cfg_flat: Mapping[str, Any], metrics: Mapping[str, float], dataset: str, synthetic: bool
) -> RunSummary:
    """The summary of one run: its numbers (test split if scored, else val) and the anchors."""
    method = str(cfg_flat.get("method.name", "?"))
    backbone = str(cfg_flat.get("model.backbone", "?"))
    split = pick_split(metrics)
    run = {key: metric(metrics, key, split) for key in (*LOC_KEYS, "top5_loc", "top1_acc", "corloc")}
    components = [v for v in (run[f"boxacc_v2_iou{d}"] for d in (30, 50, 70)) if v is not None]
    if run["maxboxacc_v2"] is None and len(components) == 3:
        run["maxboxacc_v2"] = sum(components) / 3
    anchors, matched = select_anchors(method, backbone, dataset)
    comparable = matched and not synthetic
    notes = []
    if synthetic:
        notes.append(
            "**Synthetic data.** This run was trained and scored on the generated synthetic benchmark; its numbers "
            "cannot be compared with the published ones below (CUB-200-2011 / ImageNet-1K), which are shown for orientation only."
        )
    elif not matched:
        notes.append(
            f"No published numbers for backbone `{backbone}` on dataset `{dataset}`; the rows below are other "
            "backbones / datasets, for orientation only, not comparable."
        )
    interval = cfg_flat.get("eval.cam_curve_interval")
    try:
        if interval is not None and abs(float(interval) - PROTOCOL_INTERVAL) > 1e-12:
            notes.append(
                f"CAM thresholds every {float(interval):g} (the protocol's step is {PROTOCOL_INTERVAL:g}); "
                "MaxBoxAcc may be slightly lower than with the full threshold sweep."
            )
    except (TypeError, ValueError):
        pass
    if split == "val":
        notes.append("No test-split numbers yet: this run's row is the validation split; the papers report test.")
    if comparable and not cfg_flat.get("model.pretrained"):
        notes.append(
            "The backbone was trained from scratch (`model.pretrained` unset); the papers start from ImageNet weights."
        )
    return RunSummary(
        method=method,
        backbone=backbone,
        dataset=dataset,
        synthetic=synthetic,
        split=split,
        run=run,
        anchors=anchors,
        anchors_match=matched,
        comparable=comparable,
        switches=method_switches(cfg_flat),
        notes=notes,
    )


def _dataset_display(name: str) -> str:
    return {"cub": "CUB-200-2011", "imagenet": "ImageNet-1K"}.get(name, name)


def summary_rows(summary: RunSummary) -> tuple[list[str], list[list[str]], list[str]]:
    header = [
        "",
        "backbone",
        "dataset",
        "MaxBoxAccV2",
        "IoU 0.3",
        "IoU 0.5",
        "IoU 0.7",
        "MaxBoxAcc (v1)",
        "GT-known Loc",
        "Top-1 Loc",
        "PxAP",
        "source",
    ]
    run_label = "**this run**" + (
        " (synthetic: not comparable)" if summary.synthetic else "" if summary.comparable else " (not comparable)"
    )
    r = summary.run
    rows = [[run_label, summary.backbone, summary.dataset, *(fmt(r[key]) for key in LOC_KEYS), summary.split or "–"]]
    cited: list[str] = []
    for merged in merge_anchors(summary.anchors):
        refs = []
        for source in merged["sources"]:
            if source not in cited:
                cited.append(source)
            refs.append(cited.index(source) + 1)
        rows.append(
            [merged["display"], merged["backbone"], _dataset_display(merged["dataset"])]
            + [fmt(merged[key]) for key in LOC_KEYS]
            + [f"[{', '.join(str(ref) for ref in sorted(refs))}]"]
        )
    return header, rows, cited


def merge_anchors(anchors: Sequence[Anchor]) -> list[dict[str, Any]]:
    """One row per (label, backbone, dataset): the numbers of several tables of one paper side by
    side (the first source wins where two report the same number)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for anchor in anchors:
        key = (anchor.display, anchor.backbone, anchor.dataset)
        row = merged.setdefault(
            key,
            {
                "display": anchor.display,
                "method": anchor.method,
                "backbone": anchor.backbone,
                "dataset": anchor.dataset,
                "sources": [],
                **{k: None for k in LOC_KEYS},
            },
        )
        row["sources"].append(anchor.source)
        for field_name in LOC_KEYS:
            if row[field_name] is None:
                row[field_name] = getattr(anchor, field_name)
    return list(merged.values())


def _switch_text(switches: Mapping[str, bool]) -> str:
    return ", ".join(f"{switch_name(k)} {'on' if v else 'off'}" for k, v in switches.items()) or "–"


def render_summary_markdown(summary: RunSummary) -> str:
    r = summary.run
    lines = [
        f"# WSOL run summary: {summary.method} / {summary.backbone} / {summary.dataset}",
        "",
        f"- **method** `{summary.method}` ({_switch_text(summary.switches)})",
        f"- **backbone** `{summary.backbone}`, **dataset** `{summary.dataset}`"
        + (" (**synthetic**)" if summary.synthetic else ""),
        f"- **split** {summary.split or 'unprefixed metrics'}; **MaxBoxAccV2** {fmt(r['maxboxacc_v2'])}, "
        f"**GT-known Loc** {fmt(r['gt_known_loc'])}, **Top-1 Loc** {fmt(r['top1_loc'])}"
        + (f", **CorLoc** {fmt(r['corloc'])}" if r.get("corloc") is not None else "")
        + (f", **Top-1 Acc** {fmt(r['top1_acc'])}" if r.get("top1_acc") is not None else ""),
        "",
    ]
    for note in summary.notes:
        lines += [f"> {note}", ""]
    header, rows, cited = summary_rows(summary)
    lines += [
        "## Against published numbers" + ("" if summary.comparable else " (not comparable: orientation only)"),
        "",
    ]
    lines += [markdown_table(header, rows, ["l", "l", "l"] + ["r"] * 6 + ["l"]), ""]
    if summary.comparable and r["maxboxacc_v2"] is not None:
        deltas = [
            f"{m['display']}: {r['maxboxacc_v2'] - m['maxboxacc_v2']:+.2f}"
            for m in merge_anchors(summary.anchors)
            if m["maxboxacc_v2"] is not None
        ]
        if deltas:
            lines += ["MaxBoxAccV2 of this run minus the published: " + "; ".join(deltas), ""]
    lines += ["References:", ""]
    lines += [f"{i + 1}. {SOURCES[key]}" for i, key in enumerate(cited)]
    return "\n".join(lines) + "\n"


def render_summary_html(summary: RunSummary) -> str:
    """A self-contained HTML page (no external assets) with the same content as the markdown."""
    e = html.escape
    r = summary.run
    header, rows, cited = summary_rows(summary)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>WSOL run summary</title>",
        (
            "<style>body{font-family:sans-serif;font-size:13px;margin:12px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:right;white-space:nowrap}td:first-child,th:first-child{text-align:left}"
            ".run{background:#eef6ff;font-weight:bold}.note{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 10px;margin:8px 0}"
            "</style></head><body>"
        ),
        f"<h2>WSOL run summary: {e(summary.method)} / {e(summary.backbone)} / {e(summary.dataset)}</h2>",
        (
            f"<p>method <code>{e(summary.method)}</code> ({e(_switch_text(summary.switches))}); split {e(summary.split or '–')}; "
            f"MaxBoxAccV2 <b>{fmt(r['maxboxacc_v2'])}</b>, GT-known Loc <b>{fmt(r['gt_known_loc'])}</b>, Top-1 Loc <b>{fmt(r['top1_loc'])}</b></p>"
        ),
    ]
    for note in summary.notes:
        parts.append(f"<div class='note'>{e(note.replace('**', ''))}</div>")
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for index, row in enumerate(rows):
        cells = [c.replace("**", "") for c in row]
        parts.append(f"<tr{' class=run' if index == 0 else ''}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table><ol>" + "".join(f"<li>{e(SOURCES[k])}</li>" for k in cited) + "</ol></body></html>")
    return "\n".join(parts)


_DESCRIPTION_LIMIT = 4900  # RunLogger.set_tags keeps 5000 characters of a tag


def description_text(markdown: str) -> str:
    """The markdown itself when it fits a tag; else its head and a pointer to the artifacts."""
    if len(markdown) <= _DESCRIPTION_LIMIT:
        return markdown
    head = markdown.split("## Against published numbers")[0].rstrip()
    pointer = "\n\nThe comparison with published numbers is in the artifacts `summary.html` and `summary.md`.\n"
    return head[: _DESCRIPTION_LIMIT - len(pointer)] + pointer


def log_run_summary(
    logger: RunLogger, cfg_flat: dict, metrics: dict, dataset: str, synthetic: bool, set_description: bool = True
) -> str:
    """Log ``summary.md``, ``summary.html`` and ``summary.json`` into the run, tag it with
    ``wsol.dataset`` / ``wsol.synthetic`` / ``wsol.comparable``, and (by default) make the markdown
    the run's description, shown on its MLflow page. Returns the markdown.

    ``cfg_flat``: the flattened config (``wsol_core.config.flatten(cfg)``); ``metrics``: the final
    metrics with split prefixes (``test/maxboxacc_v2`` ...; val is used when test is absent);
    ``dataset``: the manifest's dataset name; ``synthetic``: True for the generated benchmark.
    A no-op apart from building the text when ``logger`` is disabled (ranks other than 0).
    """
    summary = build_run_summary(cfg_flat, metrics, dataset, synthetic)
    summary.run_id = getattr(logger, "run_id", "") or ""
    markdown = render_summary_markdown(summary)
    if not getattr(logger, "enabled", False):
        return markdown
    logger.log_text(markdown, "summary.md")
    logger.log_text(render_summary_html(summary), "summary.html")
    logger.log_dict(summary.to_dict(), "summary.json")
    tags = {
        "wsol.dataset": normalize_dataset(dataset),
        "wsol.synthetic": str(bool(synthetic)).lower(),
        "wsol.comparable": str(summary.comparable).lower(),
    }
    if set_description:
        tags["mlflow.note.content"] = description_text(markdown)
    logger.set_tags(tags)
    return markdown


def dumps_summary(summary: RunSummary) -> str:
    return json.dumps(summary.to_dict(), indent=2, sort_keys=True)
