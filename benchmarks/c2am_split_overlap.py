r"""Whether fine-tuned C2AM's trained maps follow the object or the split its objective preferred at
the start: the trunk's first principal direction.

    uv run python benchmarks/c2am_split_overlap.py --ablation benchmarks/results/<sweep>.json \
        --trunk ~/.cache/wsol/trunks/tiny-<key>.pth

``benchmarks/trunk_objectness.py`` found, before any training, that the proxy trunk's ``block4``
has one dominant direction whose split (the cells on one side of zero along it) covers about as
much of the map as the box does, lies partly on the object (cell AUC 0.79-0.82), and that C2AM's
eq. 9 scores that split at half the loss of the GT boxes (BENCHMARKS.md, "What a trunk's features
offer C2AM at the start"). That is a mechanism for the fine-tuned runs whose class-agnostic map
misses the body; this measures whether the trained maps end where it says. For each C2AM model
of a sweep (loaded from its MLflow run), on the test split:

- ``auc_vs_box``: the cell AUC of the trained map (the one the protocol scores) against the cells
  inside the GT box (more than half covered), i.e. how well the map ranks object over background;
- ``auc_vs_pc1_split``: the same map's cell AUC against the trunk's PC1 split, on the side that
  agrees best (a principal direction's sign is arbitrary), and which side that is;
- ``corr_with_pc1``: the Pearson correlation over all cells between the trained map and the
  trunk's PC1 projection (signed, on the side above);
- the map's MaxBoxAccV2 (the protocol's, as ``trunk_objectness.box_scores`` computes it) beside
  the run's own logged test score.

The direction is fitted on the trunk's ``block4`` descriptors of the same test images, as DDT fits
the images it localizes, and as ``trunk_objectness.py`` does. For reference the payload also
holds the PC1 split's own AUC against the boxes. A map that followed the split would score near 1
on the split and near the split's own AUC on the boxes.
Writes ``benchmarks/results/c2am_split_overlap_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from benchmarks.trunk_objectness import (  # noqa: E402
    OBJECT_CELL,
    Split,
    box_scores,
    cell_auc,
    collect,
    coverage,
    descriptors,
    principal_directions,
    project,
)


def agreement(maps: torch.Tensor, pc_map: torch.Tensor, inside: torch.Tensor) -> dict[str, float | str]:
    """How a trained map ``maps`` ``[N, h, w]`` agrees with the GT-box cells ``inside`` (bool, same
    shape) and with the split at zero of the trunk's principal projection ``pc_map`` (same shape)."""
    if maps.shape != pc_map.shape or maps.shape != inside.shape:
        raise ValueError(
            f"shapes differ: maps {tuple(maps.shape)}, pc {tuple(pc_map.shape)}, boxes {tuple(inside.shape)}"
        )
    plus = cell_auc(maps, pc_map > 0)
    side = "plus" if plus >= 0.5 else "minus"
    x = maps.flatten().double() - maps.double().mean()
    y = pc_map.flatten().double() - pc_map.double().mean()
    corr = float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-30))
    return {
        "auc_vs_box": cell_auc(maps, inside),
        "auc_vs_pc1_split": max(plus, 1.0 - plus),
        "pc1_side": side,
        "corr_with_pc1": corr if side == "plus" else -corr,
    }


@torch.no_grad()
def trained_maps(method, batches: list) -> torch.Tensor:
    """``[N, h, w]``: the method's inference maps of the real (not padding) images of ``batches``."""
    method.eval()
    out = []
    for batch in batches:
        keep = batch.real_indices()
        out.append(method.inference(batch.images, batch.labels).maps[keep].float())
    return torch.cat(out)


def on_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``maps`` resized to ``grid`` (bilinear) when their grid differs."""
    if tuple(maps.shape[-2:]) == grid:
        return maps
    return F.interpolate(maps[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablation", required=True, help="the sweep's JSON (run ids, tracking URI)")
    parser.add_argument("--trunk", required=True, help="the pretrained trunk the runs were fine-tuned from")
    parser.add_argument("--variant", default="c2am", help="the sweep's row whose runs are measured")
    parser.add_argument("--stage", default="block4", help="the trunk stage whose first direction is used")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--name", default="textured", help="the result is c2am_split_overlap_<name>.json")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    from wsol_core.models import build_backbone
    from wsol_core.train.loop import eval_loader_options
    from wsol_core.train.offline_eval import build_loader, load_model

    trunk = Path(args.trunk).expanduser().resolve()
    if not trunk.is_file():
        parser.error(f"--trunk {args.trunk}: no such file")
    sweep = json.loads(Path(args.ablation).read_text())
    if args.variant not in sweep["rows"]:
        parser.error(f"variant {args.variant!r} is not in {args.ablation} (has {', '.join(sweep['rows'])})")
    tracking_uri = sweep["mlflow"]["tracking_uri"]
    client = MlflowClient(tracking_uri)
    device = torch.device("cpu")

    reference: dict | None = None
    rows = []
    for run_id in sweep["rows"][args.variant]["run_ids"]:
        try:
            run = client.get_run(run_id)
        except Exception as exc:  # MlflowException: the sweep ran against another store
            parser.error(f"run {run_id} is not in {tracking_uri} ({exc})")
        loaded = load_model(f"runs:/{run_id}/model", tracking_uri=tracking_uri, device=device)
        method, cfg = loaded.method, loaded.cfg
        if cfg.method.name != "c2am":
            parser.error(f"run {run_id} is {cfg.method.name}, not c2am")
        split_dir = Path(run.data.params["data.resolved_root"]) / args.split
        batches = list(
            build_loader(split_dir, split_kind="eval", device=device, options=eval_loader_options(cfg), batch_size=64)
        )
        if reference is None:  # the trunk's direction, once: every run reads the same images
            backbone = build_backbone(
                cfg.model.backbone, large_feature_map=cfg.model.large_feature_map, pretrained=str(trunk)
            )
            if args.stage not in backbone.stage_names:
                parser.error(f"--stage {args.stage}: not in {list(backbone.stage_names)}")
            images: Split = collect(backbone, batches, [args.stage])
            features = images.features[args.stage]
            grid = (features.shape[-2], features.shape[-1])
            mean, directions, explained = principal_directions(descriptors(features), 1)
            pc_map = project(features, mean, directions[0])
            inside = coverage(images, grid) > OBJECT_CELL
            plus = cell_auc(pc_map, inside)
            reference = {
                "split_dir": str(split_dir),
                "images": len(images.boxes),
                "grid": list(grid),
                "pc1_explained_variance": float(explained[0]),
                "pc1_plus_side_area": float((pc_map > 0).float().mean()),
                "box_cell_share": float(inside.float().mean()),
                "pc1_auc_vs_box_plus_side": plus,
            }
        elif str(split_dir) != reference["split_dir"]:
            parser.error(f"run {run_id} read {split_dir}, the others {reference['split_dir']}")
        maps = trained_maps(method, batches)
        row = {
            "run_id": run_id,
            "seed": cfg.train.seed,
            "logged_test_maxboxacc_v2": run.data.metrics.get(f"{args.split}/maxboxacc_v2"),
            "maxboxacc_v2": box_scores(maps, images)["maxboxacc_v2"],
            **agreement(on_grid(maps, grid), pc_map, inside),
        }
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    assert reference is not None
    numeric = [k for k, v in rows[0].items() if isinstance(v, float) and k != "logged_test_maxboxacc_v2"]
    payload = {
        **payload_header("c2am_split_overlap", argv, "cpu"),
        "ablation": Path(args.ablation).name,
        "variant": args.variant,
        "trunk": str(trunk),
        "stage": args.stage,
        "split": args.split,
        "reference": reference,
        "runs": rows,
        "mean": {k: statistics.fmean(r[k] for r in rows) for k in numeric},
    }
    path = write_result(f"c2am_split_overlap_{args.name}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
