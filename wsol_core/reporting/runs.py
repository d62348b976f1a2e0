"""MLflow at the edges of the ablation report: the runs it reads, and the report run it writes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from wsol_core.reporting.ablation import RunRecord

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.tracking import MlflowClient


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
        tags={
            "wsol.report": "ablation",
            "wsol.source_runs": ",".join(source_run_ids)[:5000],
            "mlflow.note.content": markdown[:50000],
        },
    )
    logger = RunLogger(tracking_uri, run.info.run_id)
    if params:
        logger.log_params(params)
    logger.log_text(markdown, "ablation/ablation.md")
    logger.log_text(csv_text, "ablation/ablation.csv")
    logger.log_dict({"source_run_ids": list(source_run_ids)}, "ablation/sources.json")
    logger.finish("FINISHED")
    return run.info.run_id
