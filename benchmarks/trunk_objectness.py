r"""Whether a trunk's features already tell the object from its background, before any WSOL
training: the class-agnostic signal C2AM's head has to find.

    uv run python benchmarks/trunk_objectness.py --trunk ~/.cache/wsol/trunks/tiny-<key>.pth
    uv run python benchmarks/trunk_objectness.py --name textured_random_init   # the random init alone

Issue 16 left C2AM's missed target on the textured form with its cause found only by elimination
("the trunk and the data", BENCHMARKS.md): fine-tuned from the proxy trunk, 5 of 6 seeds learn a
class-agnostic map that splits the image along something other than the object, while from
scratch 3 of 3 find it. C2AM starts from pretrained features ("Supervised or unsupervised
pretraining, e.g., moco [11] and detco [40], on ImageNet-1K [28] can be adopted as
initialization of $h(\cdot)$", seed 004, Sec. 3.1; its Table 2 compares C2AM's class-agnostic
boxes with DDT's), and its contrast (eq. 1-9) starts from the foreground/background splits those
features offer. This measures what they offer, per stage of the backbone, for the pretrained
trunk and for the same architecture at its random initialisation (where a from-scratch run
starts), on one form of the synthetic benchmark:

- **unsupervised**: the principal directions of all descriptors of the split (every cell of
  every image, centred on their mean), as DDT (Wei et al., "Deep Descriptor Transforming for
  Image Co-Localization", IJCAI 2017) localizes the common object with the first one. Each of the
  first ``--components`` directions gives a map per image (the projection of each cell); both
  signs are scored with the protocol's MaxBoxAccV2, beside the sign C2AM's border check
  (``c2am.border_foreground_fraction``: the side that covers most of the border is background)
  would pick, and the cell-level AUC of telling cells inside the GT box from the rest;
- **supervised ceiling**: a logistic probe fitted on the val split's cells (inside the box or
  not), scored on the test split: what a linear 1x1 head on these features could reach if it
  were told where the box is. It bounds what a class-agnostic head like C2AM's can find in
  the features, and the gap to the first direction says how much of that signal is dominant;
- **C2AM's objective at given splits**: eq. 9 (``L_NEG + L_POS``, with ``c2am.py``'s own terms
  and defaults: row-wise rank weights at alpha 0.05, cosines clamped at 5e-4) computed on the
  features with the map ``P`` fixed to a binary split, over batches of 32 test images: the GT
  boxes, the boxes of other images (each image gets its neighbour's box: the same shapes, off the
  object), and the split at zero of each principal direction. Training moves ``P`` towards lower
  loss, so where a split off the object scores below the GT boxes, C2AM's objective on these
  features prefers it. On ``conv6`` (where C2AM's head reads ``Z``; a new layer, at its
  initialisation here in both sources) this is the objective at the first step of fine-tuning.

The stage ``image`` is the input pooled to the map's stride (colour alone), a floor.
Writes ``benchmarks/results/trunk_objectness_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

OBJECT_CELL = 0.5  # a cell is "inside the box" when the box covers more than half of it
IMAGE_STRIDE = 8  # the ``image`` stage: the input average-pooled to the tiny net's map stride
TEXTURED_FORM = ["data.synthetic.upright=true", "data.synthetic.body_texture=true"]
# The ablation's data (benchmarks/ablation.py BASE): the same cached shards the fine-tuned runs read.
ABLATION_DATA = ["data.synthetic.num_train=1200", "data.synthetic.num_val=300", "data.synthetic.num_test=300"]


@dataclass
class Split:
    """Every real (not padding) image of one split: per stage ``[N, C, h, w]`` features, the GT
    boxes in original-image pixels and the original sizes."""

    features: dict[str, torch.Tensor]
    boxes: list[torch.Tensor]
    sizes: torch.Tensor


@torch.no_grad()
def collect(backbone, loader, stages: list[str]) -> Split:
    """The backbone's output after each of ``stages`` (``image``: the pooled input) over ``loader``."""
    backbone.eval()
    trunk_stages = [s for s in stages if s != "image"]
    last = max((backbone.stage_names.index(s) for s in trunk_stages), default=-1)
    features: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    boxes: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    for batch in loader:
        keep = batch.real_indices()
        if "image" in features:
            features["image"].append(F.avg_pool2d(batch.images[keep].float(), IMAGE_STRIDE))
        x = batch.images[keep].float()
        for name in backbone.stage_names[: last + 1]:
            x = backbone.forward_features(x, after=_previous(backbone, name), until=name)
            if name in features:
                features[name].append(x)
        all_boxes = batch.gt_boxes_list()
        boxes.extend(all_boxes[i] for i in keep)
        sizes.append(batch.orig_sizes[keep])
    if not boxes:
        raise ValueError("the split gave no image")
    if any(len(b) == 0 for b in boxes):
        raise ValueError("every image needs a GT box: this measures maps against boxes")
    return Split({s: torch.cat(v) for s, v in features.items()}, boxes, torch.cat(sizes))


def _previous(backbone, stage: str) -> str | None:
    index = backbone.stage_names.index(stage)
    return backbone.stage_names[index - 1] if index else None


def coverage(split: Split, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]``: the share of each cell of ``grid`` inside a GT box."""
    from wsol_core.train.evaluate import box_coverage

    return box_coverage(split.boxes, split.sizes, grid, torch.device("cpu"))


def descriptors(features: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N * h * w, C]``, one row per cell."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).double()


def principal_directions(rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean of ``rows`` ``[M, C]``, its ``k`` leading principal directions ``[k, C]`` (unit
    length, largest variance first) and the share of the variance each explains ``[k]``."""
    mean = rows.mean(0)
    centred = rows - mean
    covariance = centred.T @ centred / max(len(rows) - 1, 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    order = values.flip(0)[:k]
    total = values.clamp(min=0).sum().clamp(min=1e-30)
    return mean, vectors.flip(1)[:, :k].T.contiguous(), order.clamp(min=0) / total


def project(features: torch.Tensor, mean: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[N, h, w]``: each cell's descriptor, centred, along ``direction`` (DDT's indicator map)."""
    return torch.einsum("nchw,c->nhw", features.double() - mean[None, :, None, None], direction).float()


def cell_auc(scores: torch.Tensor, inside: torch.Tensor) -> float:
    """The probability that a cell inside the box scores above one outside it (ties count half):
    the Mann-Whitney form of the ROC AUC."""
    scores, inside = scores.flatten().double(), inside.flatten()
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    if not n_in or not n_out:
        raise ValueError("cell AUC needs cells both inside and outside the boxes")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average ranks over ties, so a constant map scores exactly 0.5.
    unique, inverse = torch.unique(scores, return_inverse=True)
    rank_sum = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    count = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (rank_sum / count)[inverse]
    return float((ranks[inside].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def box_scores(maps: torch.Tensor, split: Split) -> dict[str, float]:
    """The protocol's box metrics of ``maps`` ``[N, h, w]`` (MaxBoxAccV2 and its IoU 0.3 / 0.5 /
    0.7 components; v1 at IoU 0.5 with the largest contour)."""
    from wsol_core.metrics import MaxBoxAccumulator, default_thresholds

    v2 = MaxBoxAccumulator(default_thresholds(), (30, 50, 70))
    v1 = MaxBoxAccumulator(default_thresholds(), (50,), largest_contour=True)
    for start in range(0, len(maps), 64):
        piece = slice(start, start + 64)
        v2.update_raw(maps[piece], split.boxes[piece], split.sizes[piece])
        v1.update_raw(maps[piece], split.boxes[piece], split.sizes[piece])
    accuracy = v2.compute()
    out = {"maxboxacc_v2": accuracy.max_box_acc_v2}
    out.update({f"iou{d}": accuracy.max_box_acc[d] for d in (30, 50, 70)})
    out["maxboxacc_v1"] = v1.compute().max_box_acc[50]
    return out


def border_says_flip(maps: torch.Tensor) -> bool:
    """C2AM's orientation check on ``maps``: min-max normalised per image, binarised at 0.5, the
    side that covers most of the border is the background, so flip when the border is mostly on."""
    from wsol_core.methods.c2am import border_foreground_fraction

    low = maps.amin((1, 2), keepdim=True)
    span = (maps.amax((1, 2), keepdim=True) - low).clamp(min=1e-12)
    return bool(border_foreground_fraction((maps - low) / span).mean() > 0.5)


def fit_probe(rows: torch.Tensor, inside: torch.Tensor, steps: int = 100, l2: float = 1e-4):
    """A class-balanced logistic regression from descriptors ``[M, C]`` to "inside the box",
    on standardised inputs; returns ``score(rows) -> logits``."""
    mean, std = rows.mean(0), rows.std(0).clamp(min=1e-6)
    x = ((rows - mean) / std).float()
    y = inside.float()
    positive = y.mean().clamp(1e-6, 1 - 1e-6)
    weights = torch.where(inside, 0.5 / positive, 0.5 / (1 - positive))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none") * weights).mean()
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w_fit, b_fit = w.detach().double(), b.detach().double()
    return lambda new_rows: (((new_rows - mean) / std) @ w_fit + b_fit).float()


def c2am_objective(features: torch.Tensor, masks: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """Eq. 9's terms (``neg``, ``pos_fg``, ``pos_bg`` and their sum) with ``P = masks``
    ``[N, h, w]`` on ``features`` ``[N, C, h, w]``, averaged over batches of ``batch_size``
    images drawn in a fixed random order (training batches mix the classes; a split is stored
    in class order), a last batch of one image, which has no pairs, left out."""
    from wsol_core.methods.c2am import C2AMConfig, contrastive_terms, fg_bg_representations

    cfg = C2AMConfig()  # the method's defaults: every term at weight 1
    sums = {"neg": 0.0, "pos_fg": 0.0, "pos_bg": 0.0}
    batches = 0
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(features), batch_size):
        take = order[start : start + batch_size]
        z, p = features[take].float(), masks[take].float()
        if len(z) < 2:
            continue
        v_f, v_b = fg_bg_representations(p, z, cfg.pool_norm)
        for name, value in contrastive_terms(v_f, v_b, cfg).items():
            sums[name] += float(value)
        batches += 1
    if not batches:
        raise ValueError("C2AM's objective needs at least two images")
    out = {name: value / batches for name, value in sums.items()}
    out["total"] = out["neg"] + out["pos_fg"] + out["pos_bg"]
    return out


def measure_stage(val: Split, test: Split, stage: str, components: int) -> dict:
    """The unsupervised directions (fitted on test's own descriptors, as DDT fits the images it
    localizes) and the probe (fitted on val, scored on test) of one stage."""
    features = test.features[stage]
    grid = (features.shape[-2], features.shape[-1])
    inside = coverage(test, grid) > OBJECT_CELL
    rows = descriptors(features)
    mean, directions, explained = principal_directions(rows, components)
    out: dict = {"channels": features.shape[1], "grid": list(grid), "box_cell_share": float(inside.float().mean())}
    found = []
    splits = {"gt_box": inside.float(), "other_images_box": inside.roll(1, dims=0).float()}
    for index, direction in enumerate(directions):
        maps = project(features, mean, direction)
        splits[f"pc{index + 1}"] = (maps > 0).float()
        plus, minus = box_scores(maps, test), box_scores(-maps, test)
        flip = border_says_flip(maps)
        found.append(
            {
                "component": index + 1,
                "explained_variance": float(explained[index]),
                "cell_auc": cell_auc(maps, inside),  # of the + side; the - side's is 1 - this
                "plus": plus,
                "minus": minus,
                "border_check_picks": "minus" if flip else "plus",
                "picked_maxboxacc_v2": (minus if flip else plus)["maxboxacc_v2"],
                "better_maxboxacc_v2": max(plus["maxboxacc_v2"], minus["maxboxacc_v2"]),
            }
        )
    out["components"] = found
    out["c2am_objective"] = {
        name: {"area": float(mask.mean()), **c2am_objective(features, mask)} for name, mask in splits.items()
    }
    val_features = val.features[stage]
    val_inside = coverage(val, (val_features.shape[-2], val_features.shape[-1])) > OBJECT_CELL
    probe = fit_probe(descriptors(val_features), val_inside.flatten())
    probe_maps = probe(rows).reshape(inside.shape)
    out["probe"] = {"cell_auc": cell_auc(probe_maps, inside), **box_scores(probe_maps, test)}
    return out


def main(argv: list[str] | None = None) -> dict:
    from wsol_core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--trunk",
        default=None,
        help="the pretrained trunk (wsol-pretrain-trunk's .pth); without it, the random init only",
    )
    parser.add_argument("--form", default="textured", choices=["textured", "default"], help="the benchmark's form")
    parser.add_argument(
        "--stages", default="image,block3,block4,conv6", help="comma-separated; image = the pooled input"
    )
    parser.add_argument("--components", type=int, default=3, help="leading principal directions scored per stage")
    parser.add_argument("--init-seed", type=int, default=0, help="the seed of the random initialisation compared")
    parser.add_argument("--name", default="", help="the result is trunk_objectness_<name>.json (default: the form)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE", help="config override; repeatable"
    )
    args = parser.parse_args(argv)

    from wsol_core.data.loader import build_loader
    from wsol_core.data.resolve import resolve_data_root
    from wsol_core.models import build_backbone
    from wsol_core.train.loop import eval_loader_options

    trunk = Path(args.trunk).expanduser().resolve() if args.trunk else None
    if trunk is not None and not trunk.is_file():
        parser.error(f"--trunk {args.trunk}: no such file")
    form = TEXTURED_FORM if args.form == "textured" else []
    try:
        cfg = load_config(overrides=[*ABLATION_DATA, *form, *args.overrides, "model.pretrained=null"])
    except ConfigError as exc:
        parser.error(str(exc))
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    started = time.perf_counter()
    root = resolve_data_root(cfg.data)

    def split(backbone, name: str) -> Split:
        loader = build_loader(root / name, split_kind="eval", options=eval_loader_options(cfg), batch_size=64)
        return collect(backbone, loader, stages)

    sources = {}
    for source in ("pretrained", "random_init") if trunk is not None else ("random_init",):
        torch.manual_seed(args.init_seed)
        backbone = build_backbone(
            cfg.model.backbone,
            large_feature_map=cfg.model.large_feature_map,
            pretrained=str(trunk) if source == "pretrained" else None,
        )
        unknown = [s for s in stages if s != "image" and s not in backbone.stage_names]
        if unknown:
            parser.error(f"--stages: {unknown} not in {cfg.model.backbone}'s stages {list(backbone.stage_names)}")
        val, test = split(backbone, "val"), split(backbone, "test")
        per_stage = {}
        for stage in stages:
            if stage == "image" and sources:
                continue  # the input does not depend on the weights: measured with the first source
            per_stage[stage] = measure_stage(val, test, stage, args.components)
            first = per_stage[stage]["components"][0]
            print(
                json.dumps(
                    {
                        "source": source,
                        "stage": stage,
                        "pc1_better": round(first["better_maxboxacc_v2"], 2),
                        "pc1_picked": round(first["picked_maxboxacc_v2"], 2),
                        "pc1_auc": round(first["cell_auc"], 3),
                        "probe": round(per_stage[stage]["probe"]["maxboxacc_v2"], 2),
                        "probe_auc": round(per_stage[stage]["probe"]["cell_auc"], 3),
                        "c2am_loss": {k: round(v["total"], 3) for k, v in per_stage[stage]["c2am_objective"].items()},
                    }
                ),
                flush=True,
            )
        sources[source] = {"stages": per_stage}
    payload = {
        **payload_header("trunk_objectness", argv),
        "trunk": str(trunk) if trunk is not None else None,
        "form": args.form,
        "data_root": str(root),
        "images": {"val": len(val.boxes), "test": len(test.boxes)},
        "backbone": cfg.model.backbone,
        "sources": sources,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    name = args.name or args.form
    path = write_result(f"trunk_objectness_{name}", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
