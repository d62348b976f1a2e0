"""Localizing a user's own pictures with a trained model.

For every image: the predicted class and its probability (methods with a classifier), the
class-specific (or class-agnostic) map, and the boxes at the threshold chosen on val, in the
image's own pixel coordinates. The boxes are the protocol's: the map is resized to 224x224
(bicubic), min-max normalized and quantized (:func:`~wsol_core.metrics.prepare_maps`), and
thresholded at ``int(t * max)``; ``box`` is the largest contour's box (the published GT-known /
Top-1 Loc box), ``boxes`` every contour's, each as the evaluator scores it: ``cv2.boundingRect``'s
``(x, y, x + w, y + h)`` clipped to the grid, so the far corner is one past the region's last
pixel (the protocol's convention). A box ``x0..x1`` (inclusive) on the 224 grid covers
original pixels ``floor(x0 * W / 224)`` to ``ceil((x1 + 1) * W / 224) - 1``.

Images come from a folder (recursively; decoded with PIL in DataLoader workers, resized to
224x224 bilinear as the protocol's evaluation transform) or a shard split (the evaluation
loader). An image that cannot be read is named, skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from wsol_core.metrics import EVAL_SIZE, prepare_float_maps
from wsol_core.metrics.reference import reference_boxes
from wsol_core.viz import IMAGENET_MEAN, IMAGENET_STD

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


@dataclass
class Prediction:
    image: str  # path relative to the input folder, or the shard key
    width: int
    height: int
    class_index: int | None
    class_name: str | None
    score: float | None  # softmax probability of the predicted class
    threshold: float
    box: list[int]  # x0, y0, x1, y1 inclusive, original pixels (largest contour)
    boxes: list[list[int]] = field(default_factory=list)  # every contour


@dataclass
class Summary:
    images: int = 0
    localized: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    threshold: float = 0.0
    seconds: float = 0.0
    images_per_s: float = 0.0
    device: str = "cpu"


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted); other files are ignored."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderImages(torch.utils.data.Dataset):
    """``(name, uint8 [224, 224, 3] tensor, (W, H))`` per image; ``(name, None, error)`` when
    the file cannot be decoded."""

    def __init__(self, root: Path, paths: list[Path]) -> None:
        self.root, self.paths = root, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        name = str(path.relative_to(self.root))
        try:
            with Image.open(path) as pil:
                pil.load()
                size = pil.size
                img = pil.convert("RGB").resize((EVAL_SIZE, EVAL_SIZE), Image.Resampling.BILINEAR)
        except Exception as exc:  # PIL raises many types on bad files
            return name, None, f"{type(exc).__name__}: {exc}"
        return name, torch.from_numpy(np.array(img, dtype=np.uint8)), size


def _collate(items):
    return items


def folder_batches(root: Path, batch_size: int, num_threads: int) -> tuple[int, Iterator]:
    """The number of images and an iterator of ``(names, uint8 images, sizes, failures)``."""
    paths = list_images(root)
    loader = torch.utils.data.DataLoader(
        FolderImages(root, paths),
        batch_size=batch_size,
        num_workers=num_threads,
        collate_fn=_collate,
    )

    def batches():
        for items in loader:
            good = [(n, img, size) for n, img, size in items if img is not None]
            failures = [(n, err) for n, img, err in items if img is None]
            if good:
                names, images, sizes = zip(*good)
                yield list(names), torch.stack(images), list(sizes), failures
            else:
                yield [], None, [], failures

    return len(paths), batches()


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> the protocol's normalized float NCHW."""
    mean = torch.tensor(IMAGENET_MEAN, device=device) * 255
    std = torch.tensor(IMAGENET_STD, device=device) * 255
    return ((images.to(device).float() - mean) / std).permute(0, 3, 1, 2).contiguous()


def to_original(box: np.ndarray, width: int, height: int, size: int = EVAL_SIZE) -> list[int]:
    """An inclusive box on the ``size`` grid as the original pixels it covers."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [
        int(math.floor(x0 * width / size)),
        int(math.floor(y0 * height / size)),
        min(width - 1, int(math.ceil((x1 + 1) * width / size)) - 1),
        min(height - 1, int(math.ceil((y1 + 1) * height / size)) - 1),
    ]


def boxes_at(map_uint8: np.ndarray, threshold: float, width: int, height: int) -> tuple[list[int], list[list[int]]]:
    """The largest contour's box and every contour's box, in original pixels."""
    largest = reference_boxes(map_uint8, threshold, largest_contour=True)[0]
    every = reference_boxes(map_uint8, threshold)
    return to_original(largest, width, height), [to_original(b, width, height) for b in every]


def overlay(
    image: Image.Image, score_map: np.ndarray, box: list[int], boxes: list[list[int]], label: str
) -> Image.Image:
    """The map (jet, alpha 0.5) over the image at its own size, every box thin, the main box thick."""
    import matplotlib

    heat = Image.fromarray((score_map * 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    colored = (matplotlib.colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(image.convert("RGB"), Image.fromarray(colored), 0.5)
    draw = ImageDraw.Draw(blended)
    for b in boxes:
        draw.rectangle(b, outline=(255, 255, 255), width=1)
    draw.rectangle(box, outline=(0, 255, 0), width=max(2, min(image.size) // 100))
    if label:
        draw.text((4, 4), label, fill=(255, 255, 255))
    return blended


def contact_sheet(pictures: list[Path], out: Path, columns: int = 6, thumb: int = 192) -> None:
    """The overlays as thumbnails (at most ``thumb`` px a side) in a grid of ``columns``."""
    thumbs = []
    for path in pictures:
        with Image.open(path) as img:
            img.thumbnail((thumb, thumb))
            thumbs.append(img.copy())
    cell_w, cell_h = max(t.width for t in thumbs), max(t.height for t in thumbs)
    columns = min(columns, len(thumbs))
    rows = -(-len(thumbs) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (32, 32, 32))
    for i, thumbnail in enumerate(thumbs):
        sheet.paste(thumbnail, ((i % columns) * cell_w, (i // columns) * cell_h))
    sheet.save(out)


class OutputWriter:
    """predictions.jsonl / .csv, overlays/, maps/ and the summary, written as results arrive."""

    def __init__(self, out: Path, *, overlays: bool, save_maps: bool) -> None:
        self.out, self.overlays, self.save_maps = out, overlays, save_maps
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = (out / "predictions.jsonl").open("w")
        self.csv_file = (out / "predictions.csv").open("w", newline="")
        self.csv = csv.writer(self.csv_file)
        self.csv.writerow(
            [
                "image",
                "width",
                "height",
                "class_index",
                "class_name",
                "score",
                "threshold",
                "x0",
                "y0",
                "x1",
                "y1",
                "num_boxes",
            ]
        )
        self.pictures: list[Path] = []

    @staticmethod
    def file_stem(name: str) -> str:
        return name.replace("/", "__").rsplit(".", 1)[0]

    def add(self, p: Prediction, score_map: np.ndarray, picture: Image.Image | None) -> None:
        self.jsonl.write(json.dumps(asdict(p)) + "\n")
        self.csv.writerow(
            [p.image, p.width, p.height, p.class_index, p.class_name, p.score, p.threshold, *p.box, len(p.boxes)]
        )
        stem = self.file_stem(p.image)
        if self.save_maps:
            (self.out / "maps").mkdir(exist_ok=True)
            np.save(self.out / "maps" / f"{stem}.npy", score_map.astype(np.float32))
        if self.overlays and picture is not None:
            (self.out / "overlays").mkdir(exist_ok=True)
            label = f"{p.class_name or p.class_index} {p.score:.2f}" if p.class_index is not None else ""
            path = self.out / "overlays" / f"{stem}.png"
            overlay(picture, score_map, p.box, p.boxes, label).save(path)
            self.pictures.append(path)

    def close(self, summary: Summary, sheet: bool) -> None:
        self.jsonl.close()
        self.csv_file.close()
        if sheet and self.pictures:
            contact_sheet(self.pictures, self.out / "contact_sheet.png")
        (self.out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")


@torch.no_grad()
def localize_batch(
    method, images: torch.Tensor, sizes: list[tuple[int, int]], threshold: float, class_names: list[str] | None
):
    """Predictions and normalized ``[224, 224]`` maps for a normalized batch."""
    result = method.inference(images, None)
    maps = prepare_float_maps(result.maps.float())  # [B, 224, 224] in [0, 1], the protocol's normalization
    quantized = (maps * 255).to(torch.uint8).cpu().numpy()  # the protocol's uint8(map * 255)
    probs = torch.softmax(result.logits.float(), dim=1) if result.logits is not None else None
    out = []
    for i, (width, height) in enumerate(sizes):
        box, boxes = boxes_at(quantized[i], threshold, width, height)
        if probs is not None:
            score, index = probs[i].max(0)
            cls, score_value = int(index), float(score)
            name = class_names[cls] if class_names and cls < len(class_names) else None
        else:
            cls, score_value, name = None, None, None
        out.append((cls, name, score_value, box, boxes))
    return out, maps.cpu().numpy()


def localize_folder(
    method,
    root: Path,
    out: Path,
    *,
    threshold: float,
    device: torch.device,
    batch_size: int = 32,
    num_threads: int = 2,
    overlays: bool = True,
    sheet: bool = False,
    save_maps: bool = False,
    class_names: list[str] | None = None,
    progress: bool = True,
) -> Summary:
    """Localize every image under ``root`` into ``out``; returns the summary (also written)."""
    from tqdm import tqdm

    total, batches = folder_batches(root, batch_size, num_threads)
    if total == 0:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    writer = OutputWriter(out, overlays=overlays, save_maps=save_maps)
    summary = Summary(threshold=threshold, device=str(device))
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", disable=not progress, desc="localize")
    for names, images, sizes, failures in batches:
        for name, error in failures:
            summary.skipped.append({"image": name, "reason": error})
            print(f"[wsol] skipped {root / name}: {error}", flush=True)
        summary.images += len(names) + len(failures)
        if names:
            results, maps = localize_batch(method, normalize(images, device), sizes, threshold, class_names)
            for j, (name, (width, height), (cls, cname, score, box, boxes)) in enumerate(zip(names, sizes, results)):
                picture = None
                if overlays:
                    with Image.open(root / name) as pil:
                        picture = pil.convert("RGB")
                writer.add(Prediction(name, width, height, cls, cname, score, threshold, box, boxes), maps[j], picture)
                summary.localized += 1
        bar.update(len(names) + len(failures))
    bar.close()
    summary.seconds = time.perf_counter() - start
    summary.images_per_s = summary.localized / max(summary.seconds, 1e-9)
    writer.close(summary, sheet)
    return summary


def localize_shards(
    method,
    split_dir: Path,
    out: Path,
    *,
    threshold: float,
    device: torch.device,
    options,
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    overlays: bool = True,
    sheet: bool = False,
    save_maps: bool = False,
    class_names: list[str] | None = None,
    progress: bool = True,
) -> Summary:
    """Localize this rank's share of a shard split (the evaluation loader; corrupt samples are
    skipped and counted by it when ``data.skip_corrupt`` is on)."""
    from tqdm import tqdm

    from wsol_core.data.loader import build_loader
    from wsol_core.viz import denormalize

    loader = build_loader(
        split_dir,
        split_kind="eval",
        rank=rank,
        world_size=world_size,
        device=device,
        options=options,
        batch_size=batch_size,
    )
    writer = OutputWriter(out, overlays=overlays, save_maps=save_maps)
    summary = Summary(threshold=threshold, device=str(device))
    start = time.perf_counter()
    bar = tqdm(total=len(loader), unit="batch", disable=not progress, desc=f"localize rank {rank}")
    for batch in loader:
        batch = batch.to(device)
        keep = batch.real_indices()
        sizes = [(int(batch.orig_sizes[i, 0]), int(batch.orig_sizes[i, 1])) for i in keep]
        results, maps = localize_batch(method, batch.images[keep], sizes, threshold, class_names)
        pictures = denormalize(batch.images[keep]) if overlays else None
        for j, i in enumerate(keep):
            width, height = sizes[j]
            cls, cname, score, box, boxes = results[j]
            picture = (
                Image.fromarray(pictures[j]).resize((width, height), Image.Resampling.BILINEAR)
                if pictures is not None
                else None
            )
            writer.add(
                Prediction(batch.keys[i], width, height, cls, cname, score, threshold, box, boxes), maps[j], picture
            )
            summary.localized += 1
        summary.images += len(keep)
        bar.update(1)
    bar.close()
    summary.images += loader.skipped.total
    for shard, key, reason in loader.skipped.examples:
        summary.skipped.append({"image": f"{Path(shard).name}:{key}", "reason": reason})
    if loader.skipped.total > len(loader.skipped.examples):
        summary.skipped.append(
            {
                "image": "...",
                "reason": f"{loader.skipped.total - len(loader.skipped.examples)} more: {loader.skipped.summary()}",
            }
        )
    summary.seconds = time.perf_counter() - start
    summary.images_per_s = summary.localized / max(summary.seconds, 1e-9)
    writer.close(summary, sheet)
    return summary


def merge_rank_outputs(out: Path, rank_dirs: list[Path], sheet: bool) -> Summary:
    """Concatenate the ranks' outputs into ``out`` (their overlays / maps are moved there)."""
    merged = Summary()
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w") as jsonl, (out / "predictions.csv").open("w", newline="") as csv_out:
        header_written = False
        for directory in rank_dirs:
            jsonl.write((directory / "predictions.jsonl").read_text())
            lines = (directory / "predictions.csv").read_text().splitlines(keepends=True)
            csv_out.writelines(lines if not header_written else lines[1:])
            header_written = True
            part = json.loads((directory / "summary.json").read_text())
            merged.images += part["images"]
            merged.localized += part["localized"]
            merged.skipped += part["skipped"]
            merged.threshold, merged.device = part["threshold"], part["device"]
            merged.seconds = max(merged.seconds, part["seconds"])
            for sub in ("overlays", "maps"):
                if (directory / sub).is_dir():
                    (out / sub).mkdir(exist_ok=True)
                    for f in (directory / sub).iterdir():
                        f.replace(out / sub / f.name)
    merged.images_per_s = merged.localized / max(merged.seconds, 1e-9)
    if sheet and (out / "overlays").is_dir():
        contact_sheet(sorted((out / "overlays").iterdir()), out / "contact_sheet.png")
    (out / "summary.json").write_text(json.dumps(asdict(merged), indent=2) + "\n")
    return merged


__all__ = [
    "Prediction",
    "Summary",
    "boxes_at",
    "list_images",
    "localize_folder",
    "localize_shards",
    "merge_rank_outputs",
    "to_original",
]
