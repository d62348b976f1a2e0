"""Run summaries and ablation tables for the MLflow dashboard.

Two products, both built by pure functions over plain dicts (easy to test) with thin MLflow I/O
at the edges:

- **Run summary** (:func:`build_run_summary`, :func:`log_run_summary`): the run's MaxBoxAccV2,
  GT-known Loc and Top-1 Loc beside the published numbers for the same backbone and dataset
  (:data:`ANCHORS`, each with its citation), logged as ``summary.md`` / ``summary.html`` /
  ``summary.json`` and as the run's description, which MLflow renders on the run page. Runs on
  the synthetic benchmark (or on a backbone / dataset with no published numbers) are marked as
  not comparable, and the published rows are shown for orientation only.
- **Ablation table** (:func:`build_ablation_table`): runs grouped by configuration (several seeds
  of one configuration become one row with mean and standard deviation), labelled from the
  method's on/off switches (``method.srd.enabled`` ...), in the papers' layout: MaxBoxAccV2 at
  IoU 0.3 / 0.5 / 0.7, their mean, and Top-1 Loc. Written as markdown and CSV
  (:func:`ablation_markdown`, :func:`ablation_csv`); ``jobs/ablation_report.py`` is the CLI.

Every localization number is a percentage (the protocol's ``100 * correct / images``).
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import html
import io
import json
import math
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient

    from wsol_core.tracking import RunLogger

# ---------------------------------------------------------------------------------------------
# Published anchors
# ---------------------------------------------------------------------------------------------

_FMCG = (
    "W. Lee, M. Ki, C. Mun, S. Kho, H. Byun, \"Foreground Mining via Contrastive Guidance for Weakly "
    "Supervised Object Localization\" (BMVC-format paper; ../shared/seeds/000_bec529611bbc7461.txt)"
)
SOURCES: dict[str, str] = {
    "choe2020": (
        "J. Choe, S. J. Oh, S. Lee, S. Chun, Z. Akata, H. Shim, \"Evaluating Weakly Supervised Object "
        "Localization Methods Right\", CVPR 2020; CAM's MaxBoxAccV2 as reprinted in FMCG Table 5 "
        "(and per IoU for VGG16 / CUB in CAML Table 1)"
    ),
    "choe2020_best": (
        "Choe et al., CVPR 2020: the best WSOL method per backbone and dataset, as reprinted in "
        "C2AM Table 3 (\"Best WSOL\")"
    ),
    "fmcg_t1": f"{_FMCG}, Table 1 (ablation, VGG16 on CUB-200-2011)",
    "fmcg_t5": f"{_FMCG}, Table 5 (MaxBoxAccV2)",
    "fmcg_t6": f"{_FMCG}, Table 6 (GT-known Loc / Top-1 Loc)",
    "cam_fmcg_t6": (
        f"B. Zhou et al., \"Learning Deep Features for Discriminative Localization\", CVPR 2016; CAM's "
        f"GT-known / Top-1 Loc at the original fixed CAM threshold, as tabulated in {_FMCG}, Table 6"
    ),
    "caml_t1": (
        "M. Ki, Y. Uh, J. Choe, H. Byun, \"Contrastive Attention Maps for Self-supervised "
        "Co-localization\", ICCV; Table 1 (MaxBoxAccV2 per IoU, VGG16 on CUB-200-2011)"
    ),
    "c2am_t3": (
        "J. Xie, J. Xiang, J. Chen, X. Hou, X. Zhao, L. Shen, \"C2AM: Contrastive learning of "
        "Class-agnostic Activation Map for Weakly Supervised Object Localization and Semantic "
        "Segmentation\", CVPR; Table 3 (MaxBoxAccV2)"
    ),
    "c2am_t2": (
        "Xie et al. (C2AM), CVPR; Table 2 (GT-known Loc, supervised pre-training, class-agnostic maps)"
    ),
}


@dataclass(frozen=True)
class Anchor:
    """One published result. ``None`` where the source does not report the number."""

    method: str  # the project's method name where it has one: cam, fmcg, caml, c2am; else a label
    backbone: str  # vgg16, resnet50, inception_v3
    dataset: str  # cub, imagenet
    source: str  # key of SOURCES
    maxboxacc_v2: float | None = None
    boxacc_v2_iou30: float | None = None
    boxacc_v2_iou50: float | None = None
    boxacc_v2_iou70: float | None = None
    gt_known_loc: float | None = None  # one box per image (largest contour), IoU >= 0.5
    top1_loc: float | None = None
    maxboxacc_v1: float | None = None  # the protocol's original MaxBoxAcc (largest contour, IoU 0.5)
    pxap: float | None = None  # OpenImages
    label: str = ""  # row label; default: the method in capitals

    @property
    def display(self) -> str:
        return self.label or self.method.upper()


# Numbers copied from the tables named in SOURCES (percent).
ANCHORS: tuple[Anchor, ...] = (
    # CAM baseline, the protocol paper's MaxBoxAccV2 (FMCG Table 5; CAML Table 1 for the IoU split).
    Anchor("cam", "vgg16", "cub", "choe2020", 63.7, 96.77, 73.14, 21.23),
    Anchor("cam", "inception_v3", "cub", "choe2020", 56.7),
    Anchor("cam", "resnet50", "cub", "choe2020", 63.0),
    Anchor("cam", "vgg16", "imagenet", "choe2020", 60.0),
    Anchor("cam", "inception_v3", "imagenet", "choe2020", 63.4),
    Anchor("cam", "resnet50", "imagenet", "choe2020", 63.7),
    # CAM at the original fixed threshold (FMCG Table 6): a different protocol, shown for reference.
    Anchor("cam", "vgg16", "cub", "cam_fmcg_t6", gt_known_loc=56.00, top1_loc=44.15, label="CAM (fixed threshold)"),
    Anchor("cam", "inception_v3", "cub", "cam_fmcg_t6", gt_known_loc=55.10, top1_loc=43.70, label="CAM (fixed threshold)"),
    Anchor("cam", "resnet50", "cub", "cam_fmcg_t6", top1_loc=49.41, label="CAM (fixed threshold)"),
    Anchor("cam", "vgg16", "imagenet", "cam_fmcg_t6", gt_known_loc=57.72, top1_loc=42.80, label="CAM (fixed threshold)"),
    Anchor("cam", "inception_v3", "imagenet", "cam_fmcg_t6", gt_known_loc=62.68, top1_loc=46.30, label="CAM (fixed threshold)"),
    Anchor("cam", "resnet50", "imagenet", "cam_fmcg_t6", gt_known_loc=51.86, top1_loc=38.99, label="CAM (fixed threshold)"),
    # Best WSOL method of the protocol paper (C2AM Table 3).
    Anchor("best-wsol", "vgg16", "cub", "choe2020_best", 66.3, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "inception_v3", "cub", "choe2020_best", 58.8, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "resnet50", "cub", "choe2020_best", 66.4, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "vgg16", "imagenet", "choe2020_best", 60.6, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "inception_v3", "imagenet", "choe2020_best", 63.9, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "resnet50", "imagenet", "choe2020_best", 63.7, label="Best WSOL (Choe et al.)"),
    # FMCG: Table 5 (MaxBoxAccV2; Table 1 for the IoU split of VGG16 / CUB) and Table 6.
    Anchor("fmcg", "vgg16", "cub", "fmcg_t1", 80.50, 99.00, 88.63, 53.88, top1_loc=65.60),
    Anchor("fmcg", "inception_v3", "cub", "fmcg_t5", 75.8),
    Anchor("fmcg", "resnet50", "cub", "fmcg_t5", 73.3),
    Anchor("fmcg", "vgg16", "imagenet", "fmcg_t5", 65.3),
    Anchor("fmcg", "inception_v3", "imagenet", "fmcg_t5", 64.8),
    Anchor("fmcg", "resnet50", "imagenet", "fmcg_t5", 65.5),
    Anchor("fmcg", "vgg16", "cub", "fmcg_t6", gt_known_loc=88.54, top1_loc=65.60),
    Anchor("fmcg", "inception_v3", "cub", "fmcg_t6", gt_known_loc=87.95, top1_loc=64.72),
    Anchor("fmcg", "resnet50", "cub", "fmcg_t6", gt_known_loc=85.17, top1_loc=69.71),
    Anchor("fmcg", "vgg16", "imagenet", "fmcg_t6", gt_known_loc=65.04, top1_loc=48.01),
    Anchor("fmcg", "inception_v3", "imagenet", "fmcg_t6", gt_known_loc=66.86, top1_loc=50.63),
    Anchor("fmcg", "resnet50", "imagenet", "fmcg_t6", gt_known_loc=66.46, top1_loc=52.59),
    # CAML (label-free co-localization), VGG16 on CUB.
    Anchor("caml", "vgg16", "cub", "caml_t1", 77.06, 96.42, 84.15, 50.60),
    # C2AM (class-agnostic maps).
    Anchor("c2am", "vgg16", "cub", "c2am_t3", 81.4),
    Anchor("c2am", "inception_v3", "cub", "c2am_t3", 82.4),
    Anchor("c2am", "resnet50", "cub", "c2am_t3", 83.8),
    Anchor("c2am", "vgg16", "imagenet", "c2am_t3", 66.3),
    Anchor("c2am", "inception_v3", "imagenet", "c2am_t3", 65.8),
    Anchor("c2am", "resnet50", "imagenet", "c2am_t3", 66.8),
    Anchor("c2am", "vgg16", "cub", "c2am_t2", gt_known_loc=75.34),
    Anchor("c2am", "resnet50", "cub", "c2am_t2", gt_known_loc=89.99),
    Anchor("c2am", "vgg16", "imagenet", "c2am_t2", gt_known_loc=63.41),
    Anchor("c2am", "resnet50", "imagenet", "c2am_t2", gt_known_loc=65.89),
)

# FMCG Table 1 (VGG16, CUB-200-2011): switches (SRD, CG, PNL) -> MaxBoxAccV2 at 0.3/0.5/0.7, mean, Top-1 Loc.
FMCG_TABLE1: tuple[tuple[str, dict[str, bool], tuple[float, float, float, float, float]], ...] = (
    ("Baseline (reproduced)", {"srd": False, "cg": False, "pnl": False}, (97.58, 78.91, 34.64, 70.38, 59.87)),
    ("Ours", {"srd": True, "cg": True, "pnl": True}, (99.00, 88.63, 53.88, 80.50, 65.60)),
    ("- SRD", {"srd": False, "cg": True, "pnl": True}, (98.65, 86.05, 46.84, 77.18, 64.22)),
    ("- CG", {"srd": True, "cg": False, "pnl": True}, (98.29, 83.07, 41.58, 74.31, 62.67)),
    ("- PNL", {"srd": True, "cg": True, "pnl": False}, (98.58, 86.78, 47.26, 77.54, 63.98)),
)

KNOWN_BACKBONES = ("vgg16", "resnet50", "inception_v3")
KNOWN_DATASETS = ("cub", "imagenet")
PROTOCOL_INTERVAL = 0.001  # Choe et al.'s CAM threshold step


def normalize_dataset(name: str) -> str:
    """``CUB-200-2011`` / ``cub200`` -> ``cub``; ``ILSVRC2012`` / ``imagenet-1k`` -> ``imagenet``."""
    lowered = (name or "").strip().lower()
    if "cub" in lowered:
        return "cub"
    if "imagenet" in lowered or "ilsvrc" in lowered:
        return "imagenet"
    if "openimages" in lowered.replace("-", "").replace("_", ""):
        return "openimages"
    return lowered or "unknown"


def normalize_backbone(name: str) -> str:
    lowered = (name or "").strip().lower().replace("-", "_")
    aliases = {"vgg": "vgg16", "vgg16_gap": "vgg16", "inceptionv3": "inception_v3", "inception": "inception_v3", "resnet": "resnet50"}
    return aliases.get(lowered, lowered)


def select_anchors(method: str, backbone: str, dataset: str) -> tuple[list[Anchor], bool]:
    """Published rows to show beside a run, and whether they match its backbone and dataset.

    A backbone or dataset with no published numbers (``tiny``, ``synthetic``) falls back to the
    CAM baseline and the run's own method on every backbone / dataset, for orientation only.
    """
    bb, ds = normalize_backbone(backbone), normalize_dataset(dataset)
    matched = bb in KNOWN_BACKBONES and ds in KNOWN_DATASETS
    rows = [a for a in ANCHORS if (bb not in KNOWN_BACKBONES or a.backbone == bb) and (ds not in KNOWN_DATASETS or a.dataset == ds)]
    if not matched:
        rows = [a for a in rows if a.method in {"cam", (method or "").lower()} and a.source != "cam_fmcg_t6"]
    rank = {"cam": 0, "best-wsol": 1}
    rows.sort(key=lambda a: (KNOWN_DATASETS.index(a.dataset), KNOWN_BACKBONES.index(a.backbone), rank.get(a.method, 2), a.method))
    return rows, matched


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

LOC_KEYS = ("maxboxacc_v2", "boxacc_v2_iou30", "boxacc_v2_iou50", "boxacc_v2_iou70", "maxboxacc_v1", "gt_known_loc", "top1_loc", "pxap")
# Runs logged before the names were made unconfusable stored the V2 components as maxboxacc_<IoU>
# (and their GT-known / Top-k Loc came from every contour, not the published single box).
LEGACY_NAMES = {f"boxacc_v2_iou{d}": f"maxboxacc_{d}" for d in (30, 50, 70)}
_SWITCH_RE = re.compile(r"^method\.([A-Za-z0-9_]+)\.enabled$")
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


def _switch_rank(key: str) -> tuple[int, str]:
    order = list(_switch_labels())
    return (order.index(key) if key in order else len(order), key)


def method_switches(params: Mapping[str, Any]) -> dict[str, bool]:
    """``{"srd": True, "cg": False, "pnl": True}`` from ``method.<part>.enabled`` params, in the
    papers' order (SRD, CG, PNL, ...; unknown parts after, alphabetically)."""
    found = {}
    for key, value in params.items():
        match = _SWITCH_RE.match(key)
        if match:
            found[match.group(1)] = truthy(value)
    return {key: found[key] for key in sorted(found, key=_switch_rank)}


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


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: Sequence[str] | None = None) -> str:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Run summary
# ---------------------------------------------------------------------------------------------


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


def build_run_summary(cfg_flat: Mapping[str, Any], metrics: Mapping[str, float], dataset: str, synthetic: bool) -> RunSummary:
    """The summary of one run: its numbers (test split if scored, else val) and the anchors."""
    method = str(cfg_flat.get("method.name", "?"))
    backbone = str(cfg_flat.get("model.backbone", "?"))
    split = pick_split(metrics)
    run = {key: metric(metrics, key, split) for key in (*LOC_KEYS, "top5_loc", "top1_acc", "corloc")}
    if run["maxboxacc_v2"] is None and all(run[f"boxacc_v2_iou{d}"] is not None for d in (30, 50, 70)):
        run["maxboxacc_v2"] = sum(run[f"boxacc_v2_iou{d}"] for d in (30, 50, 70)) / 3
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
        notes.append("The backbone was trained from scratch (`model.pretrained` unset); the papers start from ImageNet weights.")
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


def _summary_rows(summary: RunSummary) -> tuple[list[str], list[list[str]], list[str]]:
    header = ["", "backbone", "dataset", "MaxBoxAccV2", "IoU 0.3", "IoU 0.5", "IoU 0.7", "MaxBoxAcc (v1)", "GT-known Loc", "Top-1 Loc", "PxAP", "source"]
    run_label = "**this run**" + (" (synthetic: not comparable)" if summary.synthetic else "" if summary.comparable else " (not comparable)")
    r = summary.run
    rows = [[run_label, summary.backbone, summary.dataset, *(fmt(r[key]) for key in LOC_KEYS), summary.split or "–"]]
    cited: list[str] = []
    for merged in merge_anchors(summary.anchors):
        refs = []
        for source in merged["sources"]:
            if source not in cited:
                cited.append(source)
            refs.append(cited.index(source) + 1)
        rows.append([merged["display"], merged["backbone"], _dataset_display(merged["dataset"])]
                    + [fmt(merged[key]) for key in LOC_KEYS]
                    + [f"[{', '.join(str(ref) for ref in sorted(refs))}]"])
    return header, rows, cited


def merge_anchors(anchors: Sequence[Anchor]) -> list[dict[str, Any]]:
    """One row per (label, backbone, dataset): the numbers of several tables of one paper side by
    side (the first source wins where two report the same number)."""
    merged: dict[tuple, dict[str, Any]] = {}
    for anchor in anchors:
        key = (anchor.display, anchor.backbone, anchor.dataset)
        row = merged.setdefault(key, {"display": anchor.display, "method": anchor.method, "backbone": anchor.backbone,
                                      "dataset": anchor.dataset, "sources": [], **{k: None for k in LOC_KEYS}})
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
        f"- **backbone** `{summary.backbone}`, **dataset** `{summary.dataset}`" + (" (**synthetic**)" if summary.synthetic else ""),
        f"- **split** {summary.split or 'unprefixed metrics'}; **MaxBoxAccV2** {fmt(r['maxboxacc_v2'])}, "
        f"**GT-known Loc** {fmt(r['gt_known_loc'])}, **Top-1 Loc** {fmt(r['top1_loc'])}"
        + (f", **CorLoc** {fmt(r['corloc'])}" if r.get("corloc") is not None else "")
        + (f", **Top-1 Acc** {fmt(r['top1_acc'])}" if r.get("top1_acc") is not None else ""),
        "",
    ]
    for note in summary.notes:
        lines += [f"> {note}", ""]
    header, rows, cited = _summary_rows(summary)
    lines += ["## Against published numbers" + ("" if summary.comparable else " (not comparable: orientation only)"), ""]
    lines += [_markdown_table(header, rows, ["l", "l", "l"] + ["r"] * 6 + ["l"]), ""]
    if summary.comparable and r["maxboxacc_v2"] is not None:
        deltas = [f"{m['display']}: {r['maxboxacc_v2'] - m['maxboxacc_v2']:+.2f}" for m in merge_anchors(summary.anchors) if m["maxboxacc_v2"] is not None]
        if deltas:
            lines += ["MaxBoxAccV2 of this run minus the published: " + "; ".join(deltas), ""]
    lines += ["References:", ""]
    lines += [f"{i + 1}. {SOURCES[key]}" for i, key in enumerate(cited)]
    return "\n".join(lines) + "\n"


def render_summary_html(summary: RunSummary) -> str:
    """A self-contained HTML page (no external assets) with the same content as the markdown."""
    e = html.escape
    r = summary.run
    header, rows, cited = _summary_rows(summary)
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


def log_run_summary(logger: RunLogger, cfg_flat: dict, metrics: dict, dataset: str, synthetic: bool, set_description: bool = True) -> str:
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


# ---------------------------------------------------------------------------------------------
# Ablation tables
# ---------------------------------------------------------------------------------------------


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


def group_key(params: Mapping[str, str], group_by: Sequence[str] | None = None, ignore: Sequence[str] = DEFAULT_GROUP_IGNORE) -> tuple:
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


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _run_value(record: RunRecord, column: str, split: str) -> float | None:
    value = metric(record.metrics, column, split)
    if value is None and column == "maxboxacc_v2":
        parts = [metric(record.metrics, f"boxacc_v2_iou{d}", split) for d in (30, 50, 70)]
        if all(p is not None for p in parts):
            value = sum(parts) / 3
    return value


def build_ablation_table(
    records: Sequence[RunRecord],
    split: str = "test",
    columns: Sequence[str] = ABLATION_COLUMNS,
    group_by: Sequence[str] | None = None,
    ignore: Sequence[str] = DEFAULT_GROUP_IGNORE,
    switch_keys: Sequence[str] | None = None,
    label_template: str = "",
) -> AblationTable:
    """Group ``records`` by configuration and aggregate each column (mean, sample std, count).

    Rows are labelled from the method's switches (or ``label_template``); labels shared by
    different configurations get the differing params appended. Rows are ordered as in the
    papers' ablations: methods without switches, then each method's all-off baseline, its full
    configuration, and the configurations with one, two ... components off.
    """
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

    all_switches = sorted({k for r in usable for k in method_switches(r.params)}, key=_switch_rank)
    keys = [k for k in (switch_keys or all_switches)]
    rows: list[AblationRow] = []
    for members in groups.values():
        first = members[0]
        method = first.params.get("method.name", "?")
        switches = method_switches(first.params)
        mean, std, count = {}, {}, {}
        for column in columns:
            values = [v for v in (_run_value(r, column, split) for r in members) if v is not None]
            mean[column], std[column] = _mean_std(values)
            count[column] = len(values)
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
        keys = {k for k in a.params.keys() | b.params.keys() if not _ignored(k, ignore) and not _SWITCH_RE.match(k)}
        return sum(a.params.get(k) != b.params.get(k) for k in keys)

    for row in rows:
        full = [r for r in rows if r.method == row.method and r.switches and all(r.switches.values())]
        # With several full configurations (the paper's settings, a searched one), an ablated row
        # is compared with the one it differs from only by its switches: the nearest in params.
        nearest = min(full, key=lambda r: params_apart(row, r), default=None)
        if nearest and "maxboxacc_v2" in columns and row.mean.get("maxboxacc_v2") is not None and nearest.mean.get("maxboxacc_v2") is not None:
            row.delta_vs_full = row.mean["maxboxacc_v2"] - nearest.mean["maxboxacc_v2"]
    return AblationTable(rows=rows, columns=tuple(columns), split=split, switch_keys=keys, synthetic=any(r.synthetic for r in rows), skipped=skipped)


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
    header = ["Method"] + [switch_name(k) for k in table.switch_keys] + ["n"] + [COLUMN_TITLES.get(c, c) for c in table.columns]
    header.append("Δ Mean vs full")
    body = []
    for row in table.rows:
        marks = ["✓" if row.switches.get(k) else ("✗" if k in row.switches else "") for k in table.switch_keys]
        cells = [fmt(row.mean[c], row.std[c]) for c in table.columns]
        body.append([row.label, *marks, str(row.n), *cells, "–" if row.delta_vs_full is None else f"{row.delta_vs_full:+.2f}"])
    align = ["l"] + ["c"] * len(table.switch_keys) + ["r"] * (len(header) - 1 - len(table.switch_keys))
    lines = [f"# {title}", ""]
    lines.append(
        f"Split `{table.split}`; values in percent, mean ± sample standard deviation over the n runs of a configuration "
        "(no ± for a single run). MaxBoxAccV2 is the mean over IoU 0.3 / 0.5 / 0.7 (Choe et al., CVPR 2020)."
    )
    lines.append("")
    if table.synthetic:
        lines += ["> **Synthetic data**: these runs use the generated benchmark; they cannot be compared with the papers' numbers.", ""]
    lines += [_markdown_table(header, body, align), ""]
    lines += ["Runs per row:", ""]
    lines += [f"- {row.label}: {', '.join(f'`{rid}` (seed {s})' for rid, s in zip(row.run_ids, row.seeds))}" for row in table.rows]
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
        ref_rows = [[label, *("✓" if s[k] else "✗" for k in ("srd", "cg", "pnl")), *(f"{v:.2f}" for v in values)] for label, s, values in FMCG_TABLE1]
        lines += [_markdown_table(ref_header, ref_rows, ["l", "c", "c", "c"] + ["r"] * 5), "", f"Source: {SOURCES['fmcg_t1']}.", ""]
    return "\n".join(lines)


def ablation_csv(table: AblationTable) -> str:
    """One line per row: label, method, switches, n, run ids, seeds, then mean / std / count per column."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = ["label", "method", *(f"{k}_enabled" for k in table.switch_keys), "n", "split", "synthetic", "run_ids", "seeds"]
    for column in table.columns:
        header += [f"{column}_mean", f"{column}_std", f"{column}_n"]
    header.append("delta_maxboxacc_v2_vs_full")
    writer.writerow(header)

    def num(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    for row in table.rows:
        line = [row.label, row.method, *(("" if k not in row.switches else str(row.switches[k]).lower()) for k in table.switch_keys)]
        line += [row.n, table.split, str(row.synthetic).lower(), ";".join(row.run_ids), ";".join(row.seeds)]
        for column in table.columns:
            line += [num(row.mean[column]), num(row.std[column]), row.count[column]]
        line.append(num(row.delta_vs_full))
        writer.writerow(line)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# MLflow I/O for the ablation report
# ---------------------------------------------------------------------------------------------


def fetch_runs(
    client: MlflowClient,
    experiments: Sequence[str] = (),
    filter_string: str = "",
    run_ids: Sequence[str] = (),
    include_unfinished: bool = False,
) -> list[RunRecord]:
    """Runs by id, or by experiment names (or ids) and an MLflow filter string."""
    from mlflow.exceptions import MlflowException

    runs = []
    if run_ids:
        runs = [client.get_run(run_id) for run_id in run_ids]
    if experiments:
        experiment_ids = []
        for name in experiments:
            found = client.get_experiment_by_name(name)
            if found is None:
                try:
                    found = client.get_experiment(name)
                except MlflowException:
                    found = None
            if found is None:
                raise ValueError(f"no MLflow experiment named (or with id) {name!r}")
            experiment_ids.append(found.experiment_id)
        token = None
        while True:
            page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    elif filter_string and not run_ids:
        raise ValueError("a filter string needs at least one experiment")
    seen, records = set(), []
    for run in runs:
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        if not include_unfinished and run.info.status != "FINISHED" and not run_ids:
            continue
        records.append(RunRecord.from_mlflow(run))
    return records


def log_ablation_report(
    tracking_uri: str,
    experiment: str,
    markdown: str,
    csv_text: str,
    source_run_ids: Sequence[str],
    run_name: str = "",
    params: Mapping[str, Any] | None = None,
) -> str:
    """A new summary run in ``experiment`` holding ``ablation/ablation.md`` and ``.csv`` (the
    markdown is also its description). Tagged ``wsol.report = ablation`` so later reports skip it."""
    from mlflow.tracking import MlflowClient

    from wsol_core.tracking import RunLogger, ensure_store, get_or_create_experiment

    ensure_store(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, experiment)
    run = client.create_run(
        experiment_id,
        run_name=run_name or f"ablation-report-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"wsol.report": "ablation", "wsol.source_runs": ",".join(source_run_ids)[:5000], "mlflow.note.content": markdown[:50000]},
    )
    logger = RunLogger(tracking_uri, run.info.run_id)
    if params:
        logger.log_params(params)
    logger.log_text(markdown, "ablation/ablation.md")
    logger.log_text(csv_text, "ablation/ablation.csv")
    logger.log_dict({"source_run_ids": list(source_run_ids)}, "ablation/sources.json")
    logger.finish("FINISHED")
    return run.info.run_id


def dumps_summary(summary: RunSummary) -> str:
    return json.dumps(summary.to_dict(), indent=2, sort_keys=True)
