"""Run summaries and ablation tables for the MLflow dashboard.

Two products, both built by pure functions over plain dicts (easy to test) with thin MLflow I/O
at the edges:

- **Run summary** (:mod:`.summary`): a run's numbers beside the published ones (:mod:`.anchors`).
- **Ablation table** (:mod:`.ablation`): runs grouped by configuration, mean ± std over seeds,
  labelled by the methods' switches, in the papers' layout; read from and logged to MLflow by
  :mod:`.runs`. ``jobs/ablation_report.py`` is the command line.

Every localization number is a percentage (the protocol's ``100 * correct / images``).
"""

from wsol_core.reporting.ablation import (
    ABLATION_COLUMNS,
    COLUMN_TITLES,
    DEFAULT_GROUP_IGNORE,
    AblationRow,
    AblationTable,
    RunRecord,
    ablation_csv,
    ablation_markdown,
    build_ablation_table,
    group_key,
    switch_label,
    template_label,
)
from wsol_core.reporting.anchors import (
    ANCHORS,
    FMCG_TABLE1,
    KNOWN_BACKBONES,
    KNOWN_DATASETS,
    PROTOCOL_INTERVAL,
    SOURCES,
    Anchor,
    normalize_backbone,
    normalize_dataset,
    select_anchors,
)
from wsol_core.reporting.common import (
    LEGACY_NAMES,
    LOC_KEYS,
    fmt,
    method_switches,
    metric,
    pick_split,
    switch_name,
    truthy,
)
from wsol_core.reporting.runs import fetch_runs, log_ablation_report
from wsol_core.reporting.summary import (
    RunSummary,
    build_run_summary,
    description_text,
    dumps_summary,
    log_run_summary,
    merge_anchors,
    render_summary_html,
    render_summary_markdown,
)

__all__ = [
    "ABLATION_COLUMNS",
    "ANCHORS",
    "COLUMN_TITLES",
    "DEFAULT_GROUP_IGNORE",
    "FMCG_TABLE1",
    "KNOWN_BACKBONES",
    "KNOWN_DATASETS",
    "LEGACY_NAMES",
    "LOC_KEYS",
    "PROTOCOL_INTERVAL",
    "SOURCES",
    "AblationRow",
    "AblationTable",
    "Anchor",
    "RunRecord",
    "RunSummary",
    "ablation_csv",
    "ablation_markdown",
    "build_ablation_table",
    "build_run_summary",
    "description_text",
    "dumps_summary",
    "fetch_runs",
    "fmt",
    "group_key",
    "log_ablation_report",
    "log_run_summary",
    "merge_anchors",
    "method_switches",
    "metric",
    "normalize_backbone",
    "normalize_dataset",
    "pick_split",
    "render_summary_html",
    "render_summary_markdown",
    "select_anchors",
    "switch_label",
    "switch_name",
    "template_label",
    "truthy",
]
