"""Evaluation speed: the one-pass box extractor against the per-threshold OpenCV contour search.

    uv run python benchmarks/eval_speed.py [--num-maps 1000 --interval 0.001 --device cpu]
    uv run python benchmarks/eval_speed.py --num-maps 50000 --device cuda --out /tmp/eval_50k.json

Generates CAM-like maps: 1-3 Gaussian blobs plus noise and a ReLU on a 14 x 14 grid (a VGG / ResNet
CAM's resolution), with one GT box per blob in a random original image size. Then, at
``--interval`` (1000 thresholds by default):

* ``end_to_end``: the whole fast pipeline, streamed in ``--batch-size`` batches: preparation on
  ``--device`` (bicubic resize to 224, min-max normalization, uint8), GT box rescaling, the numba
  extraction, and accumulation of the count state on ``--device``. This is the only part run for
  more than ``--reference-limit`` maps (the 50,000-map mode for GPU machines).
* ``fast``: :func:`wsol_core.metrics.best_iou_per_threshold` on the prepared uint8 maps;
* ``reference``: :func:`wsol_core.metrics.reference.reference_best_iou`, one ``cv2.findContours``
  per threshold as in the field's evaluator;
* ``v1``: the same two paths in largest-contour mode (MaxBoxAcc v1, the protocol's original
  metric): ``fast_v1`` against the OpenCV ``reference_v1`` (``cv2.contourArea`` picks the contour);
* ``pxap``: PxAP of the prepared float maps against masks painted from the GT boxes (an ignore
  band of 255 along the top rows): :class:`~wsol_core.metrics.PxAPAccumulator` (one bucketize
  and bincount per batch, on ``--device``) against the protocol's per-image ``np.histogram``
  (:func:`~wsol_core.metrics.reference.reference_pxap`), each over all maps in turn.

``fast`` and ``reference`` see the same maps, once each, in one process; they are timed in
interleaved chunks of ``--chunk`` maps so that both see the same background load on a shared
machine, and wall-clock and CPU seconds are both recorded. Their IoUs must be identical. The numba
JIT compile (or, when numba's on-disk cache has the kernel, the cache load) happens in a warm-up
call on two maps and is reported separately.
Writes JSON (``benchmarks/results/eval_speed.json`` unless ``--out``) and prints a one-line summary.
Target: ``fast`` >= 50x ``reference`` at 1000 thresholds on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402
from wsol_core.metrics import (  # noqa: E402
    MaxBoxAccumulator,
    PxAPAccumulator,
    best_iou_per_threshold,
    default_thresholds,
    prepare_float_maps,
    prepare_maps,
    rescale_boxes,
)
from wsol_core.metrics.boxes import _levels_batch  # noqa: E402  (compile statistics only)
from wsol_core.metrics.reference import reference_best_iou, reference_pxap  # noqa: E402

GRID = 14
Batch = tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]


def cam_batch(n: int, generator: torch.Generator, device: torch.device) -> Batch:
    """``n`` CAM-like maps ``float32 [n, 14, 14]`` on ``device``, GT boxes, original sizes.

    Each map has 1-3 Gaussian blobs of random position, width and strength plus weak noise and a
    ReLU. Each image gets a random original ``(width, height)`` and one GT box per blob (its
    2-sigma extent, stretched and shifted) in original pixel coordinates.
    """
    g = generator
    n_blobs = torch.randint(1, 4, (n,), generator=g)
    centres = torch.rand(n, 3, 2, generator=g) * (GRID - 1)
    sigmas = 0.8 + torch.rand(n, 3, generator=g) * 2.5
    weights = (0.3 + torch.rand(n, 3, generator=g)) * (torch.arange(3)[None] < n_blobs[:, None])
    axis = torch.arange(GRID, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    d2 = (xs - centres[..., 0, None, None]) ** 2 + (ys - centres[..., 1, None, None]) ** 2
    maps = (weights[..., None, None] * torch.exp(-d2 / (2 * sigmas[..., None, None] ** 2))).sum(1)
    maps = (maps + 0.05 * torch.randn(n, GRID, GRID, generator=g)).clamp_min(0)
    sizes = torch.randint(200, 900, (n, 2), generator=g)
    # Annotated extents disagree with the activation: scaled by 0.6-1.6, shifted up to a sigma.
    stretch = 0.6 + torch.rand(n, 3, 2, generator=g)
    shift = (2 * torch.rand(n, 3, 2, generator=g) - 1) * sigmas[..., None]
    boxes = []
    for i in range(n):
        scale = torch.tensor(sizes[i].tolist() * 2, dtype=torch.float32) - 1
        k = int(n_blobs[i])
        centre = (centres[i, :k] + shift[i, :k] + 0.5) / GRID
        half = (2 * sigmas[i, :k, None] / GRID) * stretch[i, :k]
        corners = torch.cat([centre - half, centre + half], dim=1).clamp(0, 1)
        boxes.append((corners * scale).round().to(torch.int64))
    return maps.to(device), boxes, sizes


def batches(num_maps: int, batch_size: int, seed: int, device: torch.device) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_maps, batch_size):
        yield cam_batch(min(batch_size, num_maps - start), generator, device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(
    args: argparse.Namespace, thresholds: np.ndarray, device: torch.device, keep: bool
) -> tuple[MaxBoxAccumulator, float, np.ndarray | None, np.ndarray | None, list[np.ndarray]]:
    """Stream all maps through ``update_raw``; optionally keep the prepared uint8 and float maps
    and the boxes."""
    acc = MaxBoxAccumulator(thresholds, device=device)
    prepared, rescaled, floats, elapsed = [], [], [], 0.0
    for maps, boxes, sizes in batches(args.num_maps, args.batch_size, args.seed, device):
        synchronize(device)
        start = time.perf_counter()
        acc.update_raw(maps, boxes, sizes)
        synchronize(device)
        elapsed += time.perf_counter() - start
        if keep:
            # For the extraction-only comparison (bounded by --reference-limit), untimed.
            prepared.append(prepare_maps(maps).cpu().numpy())
            floats.append(prepare_float_maps(maps).cpu().numpy())
            rescaled.extend(b.numpy() for b in rescale_boxes(boxes, sizes))
    if not keep:
        return acc, elapsed, None, None, rescaled
    return acc, elapsed, np.concatenate(prepared), np.concatenate(floats), rescaled


def interleaved(
    maps: np.ndarray,
    boxes: list[np.ndarray],
    thresholds: np.ndarray,
    chunk: int,
    paths: dict[str, Callable[..., np.ndarray]],
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Run every path on every chunk of maps in turn; wall and CPU seconds summed per path."""
    clocks = {name: {"seconds": 0.0, "cpu_seconds": 0.0} for name in paths}
    outputs = {name: np.empty((len(maps), len(thresholds))) for name in paths}
    for start in range(0, len(maps), chunk):
        part = slice(start, start + chunk)
        for name, path in paths.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name][part] = path(maps[part], boxes[part], thresholds)
            clocks[name]["seconds"] += time.perf_counter() - wall
            clocks[name]["cpu_seconds"] += time.process_time() - cpu
    for clock in clocks.values():
        clock["images_per_s"] = len(maps) / clock["seconds"]
    return clocks, outputs


def v1_comparison(
    maps: np.ndarray, boxes: list[np.ndarray], thresholds: np.ndarray, chunk: int, run_reference: bool
) -> dict:
    """MaxBoxAcc v1's extraction (largest contour) on both paths, interleaved like V2's."""
    paths = {"fast_v1": lambda m, b, t: best_iou_per_threshold(m, b, t, largest_contour=True)}
    if run_reference:
        paths["reference_v1"] = lambda m, b, t: reference_best_iou(m, b, t, largest_contour=True)
    clocks, outputs = interleaved(maps, boxes, thresholds, chunk, paths)
    out: dict = {**clocks, "maxboxacc_v1": float((outputs["fast_v1"] >= 0.5).mean(0).max() * 100)}
    if run_reference:
        out["speedup"] = clocks["reference_v1"]["seconds"] / clocks["fast_v1"]["seconds"]
        out["identical_iou"] = bool(np.array_equal(outputs["fast_v1"], outputs["reference_v1"]))
    return out


def box_masks(boxes: list[np.ndarray], size: int = 224) -> np.ndarray:
    """PxAP masks from the GT boxes on the 224 grid: 1 inside any box, 0 outside, 255 (ignore)
    on the top 8 rows outside the boxes."""
    masks = np.zeros((len(boxes), size, size), np.uint8)
    masks[:, :8] = 255
    for i, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in np.asarray(image_boxes).reshape(-1, 4):
            masks[i, max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = 1
    return masks


def pxap_comparison(
    maps: np.ndarray,
    boxes: list[np.ndarray],
    thresholds: np.ndarray,
    batch_size: int,
    device: torch.device,
    run_reference: bool,
) -> dict:
    masks = box_masks(boxes)
    PxAPAccumulator(thresholds, device=device).update(
        torch.from_numpy(maps[:2]).to(device), torch.from_numpy(masks[:2]).to(device)
    )  # JIT / cache load
    wall, cpu = time.perf_counter(), time.process_time()
    acc = PxAPAccumulator(thresholds, device=device)
    for start in range(0, len(maps), batch_size):
        acc.update(
            torch.from_numpy(maps[start : start + batch_size]).to(device),
            torch.from_numpy(masks[start : start + batch_size]).to(device),
        )
    value = acc.compute().pxap
    synchronize(device)
    fast = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
    fast["images_per_s"] = len(maps) / fast["seconds"]
    out: dict = {"pxap": value, "fast": fast}
    if run_reference:
        wall, cpu = time.perf_counter(), time.process_time()
        expected = reference_pxap(list(maps), list(masks), thresholds)
        ref = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu}
        ref["images_per_s"] = len(maps) / ref["seconds"]
        out.update(
            reference=ref,
            reference_pxap=expected,
            abs_diff=abs(value - expected),
            speedup=ref["seconds"] / fast["seconds"],
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-maps", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.001, help="threshold step (0.001: 1000 thresholds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256, help="streaming batch of the end-to-end run")
    parser.add_argument(
        "--reference-limit", type=int, default=2000, help="above this many maps only the end-to-end fast pipeline runs"
    )
    parser.add_argument("--fast-only", action="store_true", help="skip the OpenCV reference")
    parser.add_argument("--chunk", type=int, default=100, help="maps per interleaved timing chunk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/eval_speed.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    thresholds = default_thresholds(args.interval)
    compare = args.num_maps <= args.reference_limit
    run_reference = compare and not args.fast_only

    # JIT compile (or load from numba's on-disk cache), timed apart from everything else.
    warm_maps, warm_boxes, warm_sizes = cam_batch(2, torch.Generator().manual_seed(12345), device)
    start = time.perf_counter()
    MaxBoxAccumulator(thresholds, device=device).update_raw(warm_maps, warm_boxes, warm_sizes)
    compile_s = time.perf_counter() - start
    jit_cache_hit = sum(_levels_batch.stats.cache_hits.values()) > 0

    acc, elapsed, maps_u8, maps_float, boxes_224 = end_to_end(args, thresholds, device, keep=compare)
    result = acc.compute()
    payload: dict = {
        **payload_header("eval_speed", argv, str(device)),
        "num_maps": args.num_maps,
        "num_thresholds": len(thresholds),
        "interval": args.interval,
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "jit": {"seconds": compile_s, "from_numba_cache": jit_cache_hit},
        "end_to_end": {"seconds": elapsed, "images_per_s": args.num_maps / elapsed},
        "maxboxacc": {str(k): v for k, v in result.max_box_acc.items()},
        "maxboxacc_v2": result.max_box_acc_v2,
        "state_shape": list(acc.state_tensor().shape),
    }
    payload["machine"] |= {"numba": numba.__version__, "numpy": np.__version__}

    if compare:
        paths = {"fast": best_iou_per_threshold}
        if run_reference:
            paths["reference"] = reference_best_iou
        clocks, outputs = interleaved(maps_u8, boxes_224, thresholds, args.chunk, paths)
        payload.update(clocks)
        # The streamed accumulator must agree with the one-shot extraction of the same maps.
        for row, delta in enumerate(acc.iou_deltas):
            expected = (outputs["fast"] >= delta / 100).sum(0)
            assert np.array_equal(acc.correct[row].cpu().numpy(), expected), "accumulator mismatch"
    if compare:
        payload["v1"] = v1_comparison(maps_u8, boxes_224, thresholds, args.chunk, run_reference)
        payload["pxap"] = pxap_comparison(maps_float, boxes_224, thresholds, args.batch_size, device, run_reference)
    if run_reference:
        import cv2

        payload["speedup"] = clocks["reference"]["seconds"] / clocks["fast"]["seconds"]
        payload["speedup_cpu_time"] = clocks["reference"]["cpu_seconds"] / clocks["fast"]["cpu_seconds"]
        payload["identical_iou"] = bool(np.array_equal(outputs["fast"], outputs["reference"]))
        payload["machine"]["opencv"] = cv2.__version__
    payload["machine"]["load_average_1min_at_end"] = os.getloadavg()[0]

    path = write_result("eval_speed", payload, args.out)
    line = (
        f"eval_speed: {args.num_maps} maps x {len(thresholds)} thresholds on {device}, "
        f"{numba.get_num_threads()} numba threads: end-to-end {payload['end_to_end']['images_per_s']:.0f} img/s"
    )
    if compare:
        line += f", extraction {payload['fast']['images_per_s']:.0f} img/s"
    if run_reference:
        line += (
            f", OpenCV reference {payload['reference']['images_per_s']:.1f} img/s, "
            f"speedup {payload['speedup']:.0f}x (CPU time {payload['speedup_cpu_time']:.0f}x), "
            f"identical IoUs: {payload['identical_iou']}"
        )
    jit = "numba cache load" if jit_cache_hit else "JIT compile"
    print(f"{line}; {jit} {compile_s:.1f}s -> {path}")
    if compare:
        v1, px = payload["v1"], payload["pxap"]
        print(
            f"  v1 (largest contour): MaxBoxAcc {v1['maxboxacc_v1']:.2f}, fast {v1['fast_v1']['images_per_s']:.0f} img/s"
            + (
                f", OpenCV {v1['reference_v1']['images_per_s']:.1f} img/s, speedup {v1['speedup']:.0f}x, identical IoUs: {v1['identical_iou']}"
                if run_reference
                else ""
            )
        )
        print(
            f"  PxAP {px['pxap']:.3f}: accumulator {px['fast']['images_per_s']:.0f} img/s"
            + (
                f", np.histogram reference {px['reference']['images_per_s']:.0f} img/s, speedup {px['speedup']:.1f}x, |diff| {px['abs_diff']:.2e}"
                if run_reference
                else ""
            )
        )
    if run_reference and not (
        payload["identical_iou"] and payload["v1"]["identical_iou"] and payload["pxap"]["abs_diff"] < 1e-9
    ):
        raise SystemExit("fast path and reference disagree")
    return payload


if __name__ == "__main__":
    main()
