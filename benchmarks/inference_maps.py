"""Which map a dual-branch method should localize with: every ``inference_map`` on the same models.

    uv run python benchmarks/inference_maps.py                    # the FMCG runs of results/ablation.json, val split
    uv run python benchmarks/inference_maps.py --variant fmcg-no-srd --split test

FMCG's paper says little about inference (Sec. 4.1; see ``wsol_core/methods/fmcg.py``), so the
reading is a choice: the erased branch's CAM, the max or mean of both branches' CAMs, or the
original branch alone. This scores each reading on the same trained models -- the final models of
one ablation variant (one per seed, loaded from their MLflow runs) -- with the protocol's
evaluator at 1000 thresholds. Choose on ``val`` (the protocol's rule); ``test`` is for reporting.
Writes ``benchmarks/results/inference_maps_<variant>_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, payload_header, write_result  # noqa: E402

COLUMNS = ("boxacc_v2_iou30", "boxacc_v2_iou50", "boxacc_v2_iou70", "maxboxacc_v2", "gt_known_loc")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ablation", default=str(RESULTS_DIR / "ablation.json"), help="the sweep's JSON (run ids, tracking URI)"
    )
    parser.add_argument("--variant", default="fmcg")
    parser.add_argument("--maps", default="erased,max,mean,original")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from wsol_core.train.offline_eval import evaluate_checkpoint

    sweep = json.loads(Path(args.ablation).read_text())
    if args.variant not in sweep["rows"]:
        parser.error(f"variant {args.variant!r} is not in {args.ablation} (has {', '.join(sweep['rows'])})")
    tracking_uri = sweep["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri)
    runs = sweep["rows"][args.variant]["run_ids"]
    rows = {}
    for mode in args.maps.split(","):
        per_run = []
        for run_id in runs:
            data_root = Path(client.get_run(run_id).data.params["data.resolved_root"])
            metrics = evaluate_checkpoint(
                f"runs:/{run_id}/model",
                data_root / args.split,
                split=args.split,
                overrides=[f"method.inference_map={mode}"],
                tracking_uri=tracking_uri,
            )
            per_run.append({c: metrics[f"{args.split}/{c}"] for c in COLUMNS})
        rows[mode] = {
            c: {
                "mean": statistics.fmean(r[c] for r in per_run),
                "std": statistics.stdev(r[c] for r in per_run) if len(per_run) > 1 else None,
                "values": [r[c] for r in per_run],
            }
            for c in COLUMNS
        }
        v2 = rows[mode]["maxboxacc_v2"]
        print(
            f"{args.variant} {mode:>8} on {args.split}: MaxBoxAccV2 {v2['mean']:.2f} ± {v2['std'] or 0:.2f} "
            f"(IoU 0.7: {rows[mode]['boxacc_v2_iou70']['mean']:.2f}) over {len(per_run)} runs",
            flush=True,
        )
    payload = {
        **payload_header("inference_maps", argv, "cpu"),
        "variant": args.variant,
        "split": args.split,
        "run_ids": runs,
        "rows": rows,
        "best_by_maxboxacc_v2": max(rows, key=lambda m: rows[m]["maxboxacc_v2"]["mean"]),
    }
    path = write_result(f"inference_maps_{args.variant}_{args.split}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
