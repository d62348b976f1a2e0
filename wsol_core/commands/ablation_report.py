"""Build the papers' ablation table from MLflow runs and log it as an artifact of a summary run.

    # FMCG with SRD / CG / PNL switched off in turn, every finished run of the experiment:
    uv run python jobs/ablation_report.py --experiment cub \\
        --filter "params.\\`method.name\\` = 'fmcg' and params.\\`model.backbone\\` = 'vgg16'"
    # or exactly these runs:
    uv run python jobs/ablation_report.py --run-ids 1f0c... 9ab2... 77de...

Runs that differ only in their seed (and in bookkeeping params such as run.name) form one row
with mean ± std; rows are labelled from ``method.<part>.enabled`` params (``FMCG w/o CG``).
Writes ``ablation.md`` and ``ablation.csv`` under --output-dir and, unless --no-log, logs both
into a new run (``wsol.report = ablation``) of --summary-experiment (default: the first
--experiment, else the experiment of the first run). The tracking URI comes from
--tracking-uri, else $MLFLOW_TRACKING_URI (with $MLFLOW_TRACKING_USERNAME / _PASSWORD on a
secured server), else sqlite:///mlflow.db in the working directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsol_core.reporting import (
    ABLATION_COLUMNS,
    DEFAULT_GROUP_IGNORE,
    ablation_csv,
    ablation_markdown,
    build_ablation_table,
    fetch_runs,
    log_ablation_report,
)
from wsol_core.tracking import resolve_tracking_uri


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="", metavar="URI")
    select = parser.add_argument_group("which runs")
    select.add_argument("--experiment", action="append", default=[], help="experiment name or id; repeatable")
    select.add_argument(
        "--filter", default="", metavar="STRING", help="MLflow search filter, e.g. \"params.`method.name` = 'fmcg'\""
    )
    select.add_argument(
        "--run-ids", nargs="+", default=[], metavar="ID", help="explicit run ids (with or instead of --experiment)"
    )
    select.add_argument(
        "--include-unfinished", action="store_true", help="also runs that are not FINISHED (searched runs only)"
    )
    table = parser.add_argument_group("the table")
    table.add_argument("--split", default="test", choices=["test", "val"], help="which split's metrics (default: test)")
    table.add_argument(
        "--columns", default=",".join(ABLATION_COLUMNS), help="metric names without split prefix (default: %(default)s)"
    )
    table.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="PARAM",
        help="group only by these params (fnmatch patterns; repeatable or comma-separated)",
    )
    table.add_argument(
        "--ignore-param",
        action="append",
        default=[],
        metavar="PARAM",
        help=f"params that do not split groups, added to the defaults {', '.join(DEFAULT_GROUP_IGNORE)}",
    )
    table.add_argument(
        "--switches",
        default="",
        help="switch names to show, in order, e.g. srd,cg,pnl (default: every method.<x>.enabled found)",
    )
    table.add_argument(
        "--label",
        default="",
        metavar="TEMPLATE",
        help="row label from params, e.g. '{method.name} theta={method.srd.theta_drop}'",
    )
    table.add_argument("--title", default="", help="table title (default: from the runs)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="ablation_report", metavar="DIR")
    out.add_argument("--summary-experiment", default="", help="experiment of the summary run")
    out.add_argument("--summary-name", default="", help="name of the summary run")
    out.add_argument("--no-log", action="store_true", help="write the files only; create no summary run")
    args = parser.parse_args(argv)

    if not args.experiment and not args.run_ids:
        parser.error("give --experiment (optionally with --filter) and/or --run-ids")

    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        records = fetch_runs(client, args.experiment, args.filter, args.run_ids, args.include_unfinished)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(
            f"error: no runs matched in {tracking_uri} (experiments {args.experiment}, filter {args.filter!r}, ids {args.run_ids})",
            file=sys.stderr,
        )
        return 1

    result = build_ablation_table(
        records,
        split=args.split,
        columns=_split_list([args.columns]),
        group_by=_split_list(args.group_by) or None,
        ignore=(*DEFAULT_GROUP_IGNORE, *_split_list(args.ignore_param)),
        switch_keys=_split_list([args.switches]) or None,
        label_template=args.label,
    )
    if not result.rows:
        print("error: none of the runs has the requested metrics:\n  " + "\n  ".join(result.skipped), file=sys.stderr)
        return 1
    methods = sorted({row.method for row in result.rows})
    backbones = sorted({row.params.get("model.backbone", "?") for row in result.rows})
    title = args.title or f"Ablation: {', '.join(m.upper() for m in methods)} ({', '.join(backbones)})"
    markdown = ablation_markdown(result, title=title)
    csv_text = ablation_csv(result)

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "ablation.md").write_text(markdown, encoding="utf-8")
    (output / "ablation.csv").write_text(csv_text, encoding="utf-8")
    print(markdown)
    print(
        f"[wsol] wrote {output / 'ablation.md'} and {output / 'ablation.csv'} ({len(result.rows)} rows from {sum(r.n for r in result.rows)} runs)"
    )

    if not args.no_log:
        experiment = args.summary_experiment or (args.experiment[0] if args.experiment else "")
        if not experiment:
            experiment = client.get_experiment(client.get_run(records[0].run_id).info.experiment_id).name
        source_ids = [rid for row in result.rows for rid in row.run_ids]
        run_id = log_ablation_report(
            tracking_uri,
            experiment,
            markdown,
            csv_text,
            source_ids,
            run_name=args.summary_name,
            params={
                "report.split": args.split,
                "report.filter": args.filter or "-",
                "report.experiments": ",".join(args.experiment) or "-",
                "report.num_runs": len(source_ids),
            },
        )
        print(
            f"[wsol] logged ablation/ablation.md and ablation/ablation.csv into run {run_id} of experiment {experiment!r} ({tracking_uri})"
        )
    return 0
