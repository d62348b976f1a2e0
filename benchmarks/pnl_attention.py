"""Where FMCG's pairwise non-local block (PNL, eq. 6-7) sends each cell's attention, and what its
residual does to the localization map, on the trained models of an ablation sweep.

    uv run python benchmarks/pnl_attention.py     # the fine-tuned Table 1 of the textured form, test split

Issue 16's Table 1 found FMCG better *without* PNL on both forms of the synthetic benchmark
(BENCHMARKS.md). This measures, per trained model of each FMCG variant (loaded from its MLflow
run), on one split:

- how peaked eq. 6's ``W`` is: the mean of each row's largest weight, and the effective number of
  cells a row attends to (``exp`` of the row's entropy; the map has ``h * w`` cells);
- where the attention goes: the share of a query's attention mass that lands inside the GT box,
  for queries inside the box (more than half of the cell covered) and for queries outside it,
  beside the share of the map the box covers (what attention spread evenly would give);
- the residual's size, ``||h(v W)|| / ||F||`` per image (eq. 7's ``F' = F + h(v W)``);
- the map's mass inside the box (the share of the positive inference map that lies in the GT
  box), and MaxBoxAccV2, of the model as trained and of the same model with the residual removed
  at inference (``F' = F``), the second isolating what the block adds to the map at test time
  from what training with it did to the rest of the network.

Models without PNL get the map's mass inside the box and MaxBoxAccV2 only, as the reference.
Writes ``benchmarks/results/pnl_attention_<name>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, payload_header, write_result  # noqa: E402

OBJECT_CELL = 0.5  # a query cell is "inside the box" when the box covers more than half of it


def attention_sums(weights: torch.Tensor, coverage: torch.Tensor) -> dict[str, float]:
    """Per-batch sums of the attention statistics.

    ``weights`` ``[B, N, N]``, rows (queries) summing to 1; ``coverage`` ``[B, N]``, the share of
    each cell inside a GT box. Returns sums over images (``row_max``, ``effective_cells``,
    ``box_area``) and over query cells (``to_box_from_object`` / ``object_queries`` and
    ``to_box_from_background`` / ``background_queries``), to be divided once all batches are in.
    """
    weights = weights.float()
    entropy = -(weights.clamp(min=1e-12).log() * weights).sum(-1)  # [B, N]
    to_box = (weights * coverage[:, None, :]).sum(-1)  # [B, N]: attention mass of query i in the box
    inside = coverage > OBJECT_CELL
    return {
        "row_max": weights.max(-1).values.mean(-1).sum().item(),
        "effective_cells": entropy.exp().mean(-1).sum().item(),
        "box_area": coverage.mean(-1).sum().item(),
        "to_box_from_object": to_box[inside].sum().item(),
        "object_queries": float(inside.sum()),
        "to_box_from_background": to_box[~inside].sum().item(),
        "background_queries": float((~inside).sum()),
    }


def mass_in_box(maps: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """``[B]``: the share of each map's positive mass inside the GT box (``maps``, ``coverage``
    ``[B, h, w]`` on the same grid)."""
    positive = maps.float().clamp(min=0)
    return (positive * coverage).sum((1, 2)) / positive.sum((1, 2)).clamp(min=1e-12)


@contextlib.contextmanager
def residual_removed(method):
    """The model with eq. 7's residual dropped (``F' = F``) while the block is swapped out."""
    block = method.pnl
    method.pnl = torch.nn.Identity()
    try:
        yield method
    finally:
        method.pnl = block


@torch.no_grad()
def measure(method, loader, with_pnl: bool) -> dict[str, float]:
    """The statistics above for one model over ``loader`` (padding samples left out)."""
    from wsol_core.train.evaluate import box_coverage

    captured: dict[str, torch.Tensor] = {}
    hook = None
    if with_pnl:
        # The block's input F and output F' as inference runs it (both branches, original first).
        hook = method.pnl.register_forward_hook(lambda _m, args, out: captured.update(features=args[0], enhanced=out))
    sums: dict[str, float] = {"images": 0.0, "map_in_box": 0.0, "map_in_box_residual_removed": 0.0, "residual": 0.0}
    try:
        for batch in loader:
            keep = (~batch.is_padding).nonzero().flatten()
            boxes = [batch.gt_boxes_list()[i] for i in keep.tolist()]
            maps = method.inference(batch.images, batch.labels).maps[keep]
            grid = box_coverage(boxes, batch.orig_sizes[keep], (maps.shape[-2], maps.shape[-1]), maps.device)
            sums["map_in_box"] += mass_in_box(maps, grid).sum().item()
            sums["images"] += len(keep)
            if not with_pnl:
                continue
            features, enhanced = captured["features"][keep], captured["enhanced"][keep]  # original branch
            _, weights = method.pnl(features, return_weights=True)  # eq. 6's W, as the block computes it
            cells = box_coverage(
                boxes, batch.orig_sizes[keep], (features.shape[-2], features.shape[-1]), features.device
            )
            for name, value in attention_sums(weights, cells.flatten(1)).items():
                sums[name] = sums.get(name, 0.0) + value
            residual = (enhanced - features).flatten(1).norm(dim=1) / features.flatten(1).norm(dim=1)
            sums["residual"] += residual.sum().item()
            with residual_removed(method):
                bare = method.inference(batch.images, batch.labels).maps[keep]
            sums["map_in_box_residual_removed"] += mass_in_box(bare, grid).sum().item()
    finally:
        if hook is not None:
            hook.remove()
    n = sums["images"]
    out = {"images": int(n), "map_mass_in_box": sums["map_in_box"] / n}
    if with_pnl:
        out.update(
            w_row_max=sums["row_max"] / n,
            w_effective_cells=sums["effective_cells"] / n,
            box_area_share=sums["box_area"] / n,
            attention_into_box_from_object_queries=sums["to_box_from_object"] / max(sums["object_queries"], 1.0),
            attention_into_box_from_background_queries=sums["to_box_from_background"]
            / max(sums["background_queries"], 1.0),
            residual_norm_ratio=sums["residual"] / n,
            map_mass_in_box_residual_removed=sums["map_in_box_residual_removed"] / n,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ablation",
        default=str(RESULTS_DIR / "ablation_pretrained_textured_table1.json"),
        help="the sweep's JSON (run ids, tracking URI)",
    )
    parser.add_argument("--variants", default="fmcg,fmcg-no-srd,fmcg-no-cg,fmcg-no-pnl")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--name", default="textured_table1", help="the result is pnl_attention_<name>.json")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from wsol_core.train.evaluate import evaluate_split
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import build_loader, load_model

    sweep = json.loads(Path(args.ablation).read_text())
    tracking_uri = sweep["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri)
    device = torch.device("cpu")
    rows: dict[str, dict] = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in sweep["rows"]:
            parser.error(f"variant {variant!r} is not in {args.ablation} (has {', '.join(sweep['rows'])})")
        per_run = []
        for run_id in sweep["rows"][variant]["run_ids"]:
            try:
                run = client.get_run(run_id)
            except Exception as exc:  # MlflowException: the sweep ran against another store
                parser.error(f"variant {variant!r}: run {run_id} is not in {tracking_uri} ({exc})")
            loaded = load_model(f"runs:/{run_id}/model", tracking_uri=tracking_uri, device=device)
            method, cfg = loaded.method.eval(), loaded.cfg
            if cfg.method.name != "fmcg":
                parser.error(f"variant {variant!r}: run {run_id} is {cfg.method.name}, not fmcg")
            split_dir = Path(run.data.params["data.resolved_root"]) / args.split

            def loader(cfg=cfg, split_dir=split_dir):
                return build_loader(
                    split_dir,
                    split_kind="eval",
                    device=device,
                    options=eval_loader_options(cfg),
                    batch_size=cfg.eval.batch_size,
                )

            with_pnl = method.pnl is not None
            row = {"run_id": run_id, "seed": cfg.train.seed, **measure(method, loader(), with_pnl)}
            row["maxboxacc_v2"] = evaluate_split(method, loader(), cfg.eval, split=args.split).metrics[
                f"{args.split}/maxboxacc_v2"
            ]
            if with_pnl:
                with residual_removed(method):
                    row["maxboxacc_v2_residual_removed"] = evaluate_split(
                        method, loader(), cfg.eval, split=args.split
                    ).metrics[f"{args.split}/maxboxacc_v2"]
            print(
                json.dumps(
                    {"variant": variant, **{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}}
                ),
                flush=True,
            )
            per_run.append(row)
        numeric = [k for k, v in per_run[0].items() if isinstance(v, float)]
        rows[variant] = {
            "runs": per_run,
            "mean": {k: statistics.fmean(r[k] for r in per_run) for k in numeric},
            "std": {k: statistics.stdev(r[k] for r in per_run) for k in numeric} if len(per_run) > 1 else {},
        }
    payload = {
        **payload_header("pnl_attention", argv, "cpu"),
        "ablation": str(Path(args.ablation).name),
        "split": args.split,
        "object_cell_coverage": OBJECT_CELL,
        "rows": rows,
    }
    path = write_result(f"pnl_attention_{args.name}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
