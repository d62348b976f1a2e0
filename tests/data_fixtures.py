"""Tiny data made by the data tests themselves: images, source layouts and hand-made shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from wsol_core.data.format import build_index, index_name_for, index_text, sha256_file, tar_member
from wsol_core.data.manifest import Manifest, ShardInfo, save_manifest


def natural_array(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth-plus-texture RGB picture (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img += 25 * np.sin(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5))[..., None]
    img += rng.normal(0, 6, size=(h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(w: int = 64, h: int = 48, seed: int = 0, quality: int = 90, mode: str = "RGB") -> bytes:
    img = Image.fromarray(natural_array(w, h, seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bogus_huffman_jpeg(w: int = 64, h: int = 48, seed: int = 5) -> bytes:
    """A JPEG whose header reads (size, markers, end) but whose Huffman table is garbage: only a
    decoder finds it broken, not a header or size check."""
    good = jpeg_bytes(w, h, seed=seed)
    at = good.index(b"\xff\xc4")
    return good[: at + 4] + b"\xff" * 16 + good[at + 20 :]


def flipped_scan_jpeg(w: int = 64, h: int = 48, seed: int = 5, mode: str = "RGB") -> bytes:
    """A JPEG with a dozen bytes flipped in the middle of its scan: every marker and the header
    intact, so PIL, OpenCV, torchvision and DALI's CPU decoder all decode it into a smeared
    picture, with at most libjpeg's "Corrupt JPEG data" warning on stderr."""
    good = bytearray(jpeg_bytes(w, h, seed=seed, mode=mode))
    middle = (good.rfind(b"\xff\xda") + len(good)) // 2
    for i in range(middle, middle + 12):
        good[i] ^= 0x5A
    return bytes(good)


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(natural_array(w, h, seed)).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(w: int, h: int, box: tuple[int, int, int, int]) -> bytes:
    m = np.zeros((h, w), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0 : y1 + 1, x0 : x1 + 1] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(
    key: str,
    *,
    label: int = 0,
    w: int = 64,
    h: int = 48,
    seed: int = 0,
    boxes: list | None = None,
    image: bytes | None = None,
) -> list[tuple[str, bytes]]:
    """Well-formed members of one sample, in the writer's order."""
    meta = {
        "id": key,
        "label": label,
        "width": w,
        "height": h,
        "boxes": boxes if boxes is not None else [[2, 3, w - 5, h - 4]],
    }
    return [
        (f"{key}.cls", str(label).encode()),
        (f"{key}.jpg", image if image is not None else jpeg_bytes(w, h, seed)),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


def write_raw_split(
    split_dir: Path,
    shards: list[list[tuple[str, bytes]]],
    *,
    split: str = "val",
    num_classes: int = 3,
    labeled: bool = True,
    has_masks: bool = False,
    index: bool = True,
) -> Manifest:
    """Write shards from raw members (bypassing the writer's checks) with a matching manifest."""
    split_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for n, members in enumerate(shards):
        name = f"{split}-{n:06d}.tar"
        with tarfile.open(split_dir / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for member, data in members:
                tf.addfile(*tar_member(member, data))
        entries = build_index(split_dir / name)
        if index:
            (split_dir / index_name_for(name)).write_text(index_text(entries))
        infos.append(
            ShardInfo(
                name,
                index_name_for(name),
                len(entries),
                sha256_file(split_dir / name),
                (split_dir / name).stat().st_size,
            )
        )
    manifest = Manifest(
        dataset="handmade",
        split=split,
        num_classes=num_classes,
        class_names=[],
        shards=infos,
        labeled=labeled,
        has_masks=has_masks,
    )
    save_manifest(split_dir, manifest)
    return manifest


def good_split(split_dir: Path, n: int = 10, per_shard: int = 4, num_classes: int = 3) -> list[str]:
    """A clean hand-made split of ``n`` samples; returns the keys."""
    keys = [f"s{i:03d}" for i in range(n)]
    shards = []
    for start in range(0, n, per_shard):
        members: list[tuple[str, bytes]] = []
        for i in range(start, min(n, start + per_shard)):
            members += sample_members(keys[i], label=i % num_classes, seed=i)
        shards.append(members)
    write_raw_split(split_dir, shards, num_classes=num_classes)
    return keys


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isreg()}  # type: ignore[union-attr]


def all_members(split_dir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for tar in sorted(split_dir.glob("*.tar")):
        out.update(tar_members(tar))
    return out


def write_files(root: Path, files: Iterable[tuple[str, bytes]]) -> None:
    for rel, data in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
