"""The measurements behind two ambiguous readings: CAML's eq. 3-4 and ICL's non-local attention.

    uv run python benchmarks/readings.py                    # both, about 20 min on 2 cores
    uv run python benchmarks/readings.py --only icl         # ICL's part alone (seconds)
    uv run python benchmarks/readings.py --caml-steps 40    # a shorter CAML run

**CAML** (``wsol_core/methods/caml.py``, "What eq. 3-4 act on"): each candidate reading of the
map ``A`` and of the background rule trains CAML (default config otherwise, tiny backbone, SGD
0.01, batch 32, rotation) on the synthetic benchmark's upright creatures at 112 px, in one
process, and records per step: ``L_caml``, ``L_cls``, the share of eq. 4's first hinges that are
active, the background mask's area and the share of it inside the GT box, ``d(a, p)`` and
``d(a, n)``. The report gives the means over the first and the last 10 steps.

**ICL** (``wsol_core/methods/icl.py``, "Non-local attention"): for both ``nl.attention``
readings, at initialisation (3 seeds) on 8 structured pictures: the areas of the two drops and
of CAL's foreground mask, the share of images whose three CAL masks are all non-empty, and
``L_cal``.

Writes ``benchmarks/results/readings.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.config import load_config  # noqa: E402
from wsol_core.data.batch import Batch  # noqa: E402
from wsol_core.data.synthetic import SyntheticConfig, SyntheticWSOL  # noqa: E402
from wsol_core.methods import build_method  # noqa: E402
from wsol_core.methods.caml import activate_maps, background_mask, l2_distance  # noqa: E402

SIDE = 112
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CAML_READINGS = {
    "sigmoid+reverse_min (earlier default)": ["method.caml.map_activation=sigmoid", "method.caml.bg_rule=reverse_min"],
    "l2+map_min (default)": ["method.caml.map_activation=l2", "method.caml.bg_rule=map_min"],
    "l2+reverse_min": ["method.caml.map_activation=l2", "method.caml.bg_rule=reverse_min"],
    "none+map_min": ["method.caml.map_activation=none", "method.caml.bg_rule=map_min"],
}


def pictures(n: int, upright: bool, body_texture: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized images, labels and GT box masks ``[n, SIDE, SIDE]`` of the synthetic benchmark."""
    gen = SyntheticWSOL(SyntheticConfig(size=SIDE, upright=upright, body_texture=body_texture), seed=0)
    samples = [gen.sample("train", i) for i in range(n)]
    images = torch.tensor(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    boxes = torch.zeros(n, SIDE, SIDE)
    for i, s in enumerate(samples):
        x0, y0, x1, y1 = s.box
        boxes[i, y0 : y1 + 1, x0 : x1 + 1] = 1
    return (images - MEAN) / STD, torch.tensor([s.label for s in samples]), boxes


def batch_of(images: torch.Tensor, labels: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(
        images=images,
        labels=labels,
        keys=[""] * n,
        orig_sizes=torch.full((n, 2), SIDE),
        boxes=torch.zeros(n, 1, 4),
        num_boxes=torch.ones(n, dtype=torch.long),
    )


def caml_reading(overrides: list[str], steps: int, data, seed: int = 0) -> dict:
    images, labels, boxes = data
    cfg = load_config(base={"method": {"name": "caml"}, "model": {"backbone": "tiny"}}, overrides=overrides)
    torch.manual_seed(seed)
    model = build_method(cfg, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    draw = torch.Generator().manual_seed(seed)
    c = cfg.method.caml
    rows = []
    for step in range(steps):
        idx = torch.randint(images.shape[0], (32,), generator=draw)
        model.train()
        out = model(images[idx], labels[idx], step / steps)
        terms = model.losses(out, batch_of(images[idx], labels[idx]))
        optimizer.zero_grad()
        sum(terms.values()).backward()
        optimizer.step()
        with torch.no_grad():
            d_pos = l2_distance(out["caml_a1"], out["caml_p1"])
            d_neg = l2_distance(out["caml_a1"], out["caml_n1"])
            bg = background_mask(activate_maps(out["maps"], c.map_activation), c.theta_bg, c.bg_rule)
            cover = F.interpolate(boxes[idx][:, None], size=bg.shape[-2:], mode="area")[:, 0]
            rows.append(
                {
                    "caml": terms["caml"].item(),
                    "cls": terms["cls"].item(),
                    "active": float((d_pos - d_neg + c.margin > 0).float().mean()),
                    "bg_area": float(bg.mean()),
                    "bg_in_box": float((bg * cover).sum() / bg.sum().clamp_min(1)),
                    "d_pos": float(d_pos.mean()),
                    "d_neg": float(d_neg.mean()),
                }
            )

    def mean_of(part: list[dict]) -> dict:
        return {k: round(sum(r[k] for r in part) / len(part), 4) for k in part[0]}

    window = min(10, steps)
    return {"overrides": overrides, "first_steps": mean_of(rows[:window]), "last_steps": mean_of(rows[-window:])}


def icl_attention(mode: str, seeds: int, data) -> list[dict]:
    images, labels, _ = data
    out_rows = []
    for seed in range(seeds):
        cfg = load_config(
            base={"method": {"name": "icl"}, "model": {"backbone": "tiny"}}, overrides=[f"method.nl.attention={mode}"]
        )
        torch.manual_seed(seed)
        model = build_method(cfg, 10).train()
        out = model(images, labels, 0.5)
        terms = model.losses(out, batch_of(images, labels))
        masks = model.loss_masks(out)
        out_rows.append(
            {
                "seed": seed,
                "cal_masks_all_nonempty": float(out["z_valid"].float().mean()),
                "drop_area": float(masks["drop"].mean()),
                "bg_drop_area": float(masks["bg_drop"].mean()),
                "cal_fg_area": float(masks["cal_fg"].mean()),
                "cal": terms["cal"].item(),
            }
        )
    return out_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["caml", "icl"], default=None)
    parser.add_argument("--caml-steps", type=int, default=150)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    payload: dict = {
        **payload_header("readings", argv, "cpu"),
    }
    if args.only in (None, "icl"):
        data = pictures(8, upright=True, body_texture=True)
        payload["icl_attention"] = {mode: icl_attention(mode, 3, data) for mode in ("channel_mean", "affinity")}
        for mode, rows in payload["icl_attention"].items():
            print(
                f"[icl] {mode:13s} "
                + "; ".join(
                    f"valid {r['cal_masks_all_nonempty']:.2f} drop {r['drop_area']:.3f} bg_drop {r['bg_drop_area']:.3f}"
                    for r in rows
                ),
                flush=True,
            )
    if args.only in (None, "caml"):
        data = pictures(384, upright=True, body_texture=False)
        payload["caml_steps"] = args.caml_steps
        payload["caml_readings"] = {}
        for name, overrides in CAML_READINGS.items():
            payload["caml_readings"][name] = caml_reading(overrides, args.caml_steps, data)
            print(f"[caml] {name}: {payload['caml_readings'][name]}", flush=True)
    payload["wall_s"] = time.perf_counter() - start
    path = write_result("readings", payload, args.out or None)
    print(f"[wsol] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
