"""The summary of a finished search, logged into its MLflow parent run: a table and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsol_core.experiments.space import SearchSpace
from wsol_core.tracking import RunLogger


def record_summary(
    parent: RunLogger, top: list[dict], trials: list[dict], space: SearchSpace, best_path: Path, best: dict, metric: str
) -> None:
    """Log the search's outcome into its parent run: ``top_trials.json`` / ``.md`` (the best
    ``top`` trials by ``metric``), ``score_vs_params.png`` (each searched parameter against the
    score, by how the trial ended, the best circled), ``best_config.yaml`` and ``best.*`` tags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = {
        "rank": list(range(1, len(top) + 1)),
        "trial_id": [t["trial_id"] for t in top],
        metric: [round(t["score"], 4) for t in top],
        "epochs": [t["epochs"] for t in top],
        "status": [t["status"] for t in top],
        "mlflow_run_id": [t.get("mlflow_run_id", "") for t in top],
        **{name: [t["params"].get(name) for t in top] for name in space.searched},
    }
    parent.client.log_table(parent.run_id, data=table, artifact_file="top_trials.json")
    header = ["rank", "trial_id", metric, "epochs", "status", *space.searched]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, t in enumerate(top):
        row = [
            i + 1,
            t["trial_id"],
            f"{t['score']:.3f}",
            t["epochs"],
            t["status"],
            *(fmt(t["params"].get(n)) for n in space.searched),
        ]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    parent.log_text("\n".join(lines) + "\n", "top_trials.md")

    names = list(space.searched)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    scored = [t for t in trials if t["score"] is not None]
    for ax, name in zip(axes[0], names):
        for status, marker in (("completed", "o"), ("early_stopped", "x"), ("error", "s")):
            group = [t for t in scored if t["status"] == status]
            if group:
                ax.scatter([t["params"][name] for t in group], [t["score"] for t in group], marker=marker, label=status)
        ax.scatter([best["params"][name]], [best["score"]], s=160, facecolors="none", edgecolors="red", label="best")
        ax.set_xlabel(name)
        ax.set_ylabel("val MaxBoxAccV2")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    parent.log_figure(fig, "score_vs_params.png")
    plt.close(fig)
    parent.log_artifact(best_path)
    parent.log_metrics(
        {
            f"best/{metric}": best["score"],
            "search/trials": len(trials),
            "search/early_stopped": sum(t["status"] == "early_stopped" for t in trials),
        },
        step=0,
    )
    parent.set_tags(
        {
            "wsol.search.best_trial": best["trial_id"],
            "wsol.search.best_config": str(best_path),
            **{f"best.{k}": fmt(v) for k, v in best["params"].items()},
        }
    )


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
