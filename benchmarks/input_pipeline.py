"""Input-pipeline throughput: DALI and the torch fallback on ImageNet-like shards, and the synthetic generator.

    uv run python benchmarks/input_pipeline.py                    # CPU: DALI CPU mode vs torch, + generator
    uv run python benchmarks/input_pipeline.py --device cuda      # DALI mixed (nvJPEG) decode on a GPU

It makes its own data: ImageNet-like JPEGs (about 500 x 375 px and 110 KB each at quality 90:
multi-octave smooth noise, sharp-edged shapes and fine texture; the texture strength is tuned on
the first images to hit the target size), written as shards to a temporary directory. Each
loader then runs the protocol's training transform (resize to 256, random 224 crop, flip,
normalize) over one epoch; the first batches (pipeline start-up) are not timed.

Reported per loader: images/s (wall clock) and images per CPU-second (the CPU time of the
process and, for torch, of its worker processes: a per-core figure that holds on a loaded or
larger machine), with the threads / workers used. The synthetic generator is measured in one
process (generation + JPEG encoding). Results go to ``benchmarks/results/input_pipeline.json``
with the machine's description; one summary line is printed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from wsol_core.data.writer import EncodedSample, WriterOptions, write_split  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "input_pipeline.json"


# ---------------------------------------------------------------------------------------------
# ImageNet-like JPEGs
# ---------------------------------------------------------------------------------------------


def imagenet_like(rng: np.random.Generator, detail: float, w: int = 500, h: int = 375) -> np.ndarray:
    """A natural-looking picture: 1/f-ish smooth noise, sharp shapes and fine texture."""
    from PIL import Image, ImageDraw

    img = np.zeros((h, w, 3), dtype=np.float32)
    for octave, cells in enumerate((3, 6, 12, 24, 48, 96)):
        low = rng.normal(0, 1, size=(max(2, cells * h // w), cells, 3)).astype(np.float32)
        for c in range(3):
            up = Image.fromarray(low[..., c]).resize((w, h), Image.BICUBIC)
            img[..., c] += np.asarray(up) * (60.0 / 1.6**octave)
    img += 128
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 10))):  # edges: objects with hard boundaries
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(3, 7)))]
        draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    out = np.asarray(canvas, dtype=np.float32)
    out += rng.normal(0, detail, size=(h, w, 1)).astype(np.float32)  # fine texture (grain, foliage...)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tune_detail(target_bytes: int, seed: int = 0) -> float:
    """The texture strength that gives JPEGs of about ``target_bytes`` (bisection on 3 pictures)."""
    lo, hi = 0.0, 80.0
    for _ in range(12):
        mid = (lo + hi) / 2
        size = np.mean([len(encode(imagenet_like(np.random.default_rng([seed, i]), mid))) for i in range(3)])
        lo, hi = (mid, hi) if size < target_bytes else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class _BenchRecord:
    image_id: str
    index: int
    size_hint: int = 0


@dataclass(frozen=True)
class _PreEncoded:
    """Materializer over pre-encoded pictures (repeated, so big epochs cost little to generate)."""

    images: tuple[bytes, ...]

    def fingerprint(self) -> str:
        return f"bench:{len(self.images)}:{sum(len(b) for b in self.images)}"

    def __call__(self, record: _BenchRecord, key: str) -> EncodedSample:
        from wsol_core.data.format import meta_json

        data = self.images[record.index % len(self.images)]
        return EncodedSample(
            image=data,
            image_ext="jpg",
            json=meta_json(record.image_id, record.index % 1000, 500, 375, [[50, 40, 300, 250]]),
            cls=str(record.index % 1000).encode(),
        )


def make_shards(root: Path, num_images: int, unique: int, target_kb: int) -> dict:
    t0 = time.time()
    detail = tune_detail(target_kb * 1000)
    pictures = tuple(encode(imagenet_like(np.random.default_rng([1, i]), detail)) for i in range(unique))
    records = [_BenchRecord(f"img_{i:07d}", i) for i in range(num_images)]
    write_split(
        root,
        "train",
        records,
        _PreEncoded(pictures),
        dataset="bench",
        num_classes=1000,
        options=WriterOptions(shard_max_bytes=256_000_000, workers=1, progress=False, shuffle=False),
    )
    sizes = [len(b) for b in pictures]
    return {
        "num_images": num_images,
        "unique_pictures": unique,
        "size": [500, 375],
        "jpeg_quality": 90,
        "mean_kb": round(float(np.mean(sizes)) / 1000, 1),
        "texture_detail": round(detail, 2),
        "prepare_s": round(time.time() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _children_cpu(pids: list[int]) -> float:
    """CPU seconds used so far by live processes (utime + stime from /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure_loader(split_dir: Path, backend: str, device: str, batch_size: int, threads: int, warmup: int) -> dict:
    import torch

    from wsol_core.data.loader import build_loader

    loader = build_loader(
        split_dir,
        split_kind="train",
        backend=backend,
        device=device,
        batch_size=batch_size,
        num_threads=threads,
        resize_size=256,
        crop_size=224,
        verify="fast",
    )
    loader.set_epoch(0)
    n_batches = len(loader)
    # CPU: everything from the first request on (all DALI threads are in this process; torch's
    # workers are read from /proc before they stop). Wall clock: steady state after the warm-up.
    c_start = time.process_time()
    it = iter(loader)
    total = 0
    for _ in range(min(warmup, n_batches - 1)):
        total += len(next(it))
    inner = getattr(getattr(loader, "_loader", None), "_iterator", None)
    worker_pids = [w.pid for w in getattr(inner, "_workers", [])] if inner is not None else []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = 0
    for batch in it:
        images += len(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    total += images
    cpu = (time.process_time() - c_start) + _children_cpu(worker_pids)
    loader.close()
    return {
        "backend": backend,
        "device": device,
        "threads" if backend == "dali" else "workers": threads,
        "batch_size": batch_size,
        "timed_images": images,
        "images_per_s": round(images / wall, 1),
        "epoch_images": total,
        "images_per_cpu_s": round(total / cpu, 1) if cpu > 0 else None,
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
    }


def measure_synthetic(count: int, size: int) -> dict:
    from wsol_core.data.synthetic import SyntheticConfig, SyntheticWSOL

    gen = SyntheticWSOL(SyntheticConfig(size=size), seed=0)
    gen.encode(gen.sample("train", 0), "warm", False)
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(count):
        gen.encode(gen.sample("train", i), "x", False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    c1 = time.process_time()
    for i in range(count):
        gen.encode(gen.sample("val", i), "x", True)
    cpu_masks = time.process_time() - c1
    return {
        "size": size,
        "images": count,
        "images_per_cpu_s": round(count / cpu, 1),
        "images_per_s_wall": round(count / wall, 1),
        "with_masks_images_per_cpu_s": round(count / cpu_masks, 1),
        "processes": 1,
    }


def machine_info(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except Exception:
        info["dali"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:i] for DALI mixed decode")
    parser.add_argument(
        "--num-images", type=int, default=None, help="shard size of the run (default 384 CPU / 20000 GPU)"
    )
    parser.add_argument(
        "--unique", type=int, default=None, help="distinct pictures, repeated (default 128 CPU / 512 GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 CPU / 256 GPU")
    parser.add_argument("--threads", type=int, default=None, help="DALI threads and torch workers (default: all cores)")
    parser.add_argument("--warmup", type=int, default=2, help="batches not timed")
    parser.add_argument("--target-kb", type=int, default=110)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--synthetic-images", type=int, default=2000)
    parser.add_argument("--synthetic-only", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--workdir", default=None, help="where to write the shards (default: a temp dir)")
    args = parser.parse_args(argv)

    gpu = args.device.startswith("cuda")
    threads = args.threads or (os.cpu_count() or 1)
    batch = args.batch_size or (256 if gpu else 32)
    results: dict = {"machine": machine_info(args.device), "args": vars(args)}
    results["synthetic_generator"] = measure_synthetic(args.synthetic_images, 128)
    if not args.synthetic_only:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            data = make_shards(
                Path(tmp),
                args.num_images or (20000 if gpu else 384),
                args.unique or (512 if gpu else 128),
                args.target_kb,
            )
            results["data"] = data
            split = Path(tmp) / "train"
            results["dali"] = measure_loader(split, "dali", args.device, batch, threads, args.warmup)
            if not args.skip_torch:
                results["torch"] = measure_loader(split, "torch", args.device, batch, threads, args.warmup)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    parts = []
    for name in ("dali", "torch"):
        r = results.get(name)
        if r:
            n = r.get("threads", r.get("workers"))
            parts.append(
                f"{name} {r['device']} {r['images_per_s']:.0f} img/s ({r['images_per_cpu_s']} img/cpu-s, {n} "
                f"{'threads' if name == 'dali' else 'workers'})"
            )
    s = results["synthetic_generator"]
    parts.append(f"synthetic {s['images_per_cpu_s']:.0f} img/s/core at {s['size']} px")
    if "data" in results:
        parts.append(f"data {results['data']['mean_kb']} KB/img")
    print("input_pipeline: " + "; ".join(parts) + f" -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
