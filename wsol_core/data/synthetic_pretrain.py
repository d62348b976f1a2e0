"""A many-class synthetic classification task that stands in for ImageNet pretraining.

Real WSOL fine-tunes a trunk pretrained on ImageNet; no such weights can be downloaded on the
machines this project is proven on. This generator gives the closest runnable proxy: a
classification task *disjoint* from the WSOL benchmark (:mod:`wsol_core.data.synthetic`), with
enough classes and variety that a trunk trained on it learns general features (edges, colours,
textures, shapes) rather than the benchmark's answer.

**What is drawn.** One object per image on a cluttered background. A class is a combination of
three things, and all three are needed to tell the 120 classes apart:

* a *shape* (8): a five-lobed flower, a cross, a crescent, a triangle, a hexagon, a rhombus, a
  ring and an arrow;
* a *texture* filling it (5): stripes, dots, concentric rings, waves, a smooth gradient. Each
  texture turns with the object, and its period is drawn per image;
* a *palette* (3): warm (red-orange), green-cyan, or blue-violet hues, each drawn per image within its
  band, paired with a dark second colour.

**Disjoint from the WSOL benchmark.** No class is the benchmark's creature (an ellipse body with
a disc part and an eye), and no texture is its body checker ("scales"). The background is its
own: a smooth colour field with noise and low-saturation bars, with no grating and no
apex-up triangles. What the two share is what ImageNet shares with CUB: natural-image-like
statistics, objects on clutter, colour and texture as evidence.

**Variety.** The object's box side is 35-85 % of the image, at any position, rotation (all
angles) and aspect (0.7-1.4), with shading and pixel noise. The box (inclusive pixel corners)
and mask are the object's, so the shards are valid WSOL shards and the training job's own
evaluation runs on them. Its classification accuracy is the number that matters here.

**Determinism.** Image ``index`` of ``split`` depends only on ``(seed, split, index)`` and the
config; labels are balanced (``index % num_classes``).
"""

from __future__ import annotations

import colorsys
import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wsol_core.data.format import encode_mask_png, meta_json
from wsol_core.data.writer import EncodedSample, WriteResult, WriterOptions, write_split

SHAPES = ("flower", "cross", "crescent", "triangle", "hexagon", "rhombus", "ring", "arrow")
TEXTURES = ("stripes", "dots", "rings", "waves", "gradient")
#: Hue bands (fractions of the colour wheel) of the three palettes.
PALETTES = {"warm": (0.95, 1.10), "green": (0.25, 0.48), "cool": (0.55, 0.78)}
MAX_CLASSES = len(SHAPES) * len(TEXTURES) * len(PALETTES)  # 120


@dataclass(frozen=True)
class PretrainTaskConfig:
    """Options of the generator (all of them shape the pixels, so all are in shard fingerprints)."""

    size: int = 128
    num_classes: int = MAX_CLASSES
    min_object: float = 0.35
    max_object: float = 0.85
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"pretraining image size {self.size} must be >= 32 px")
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"pretraining classes {self.num_classes} must be in [2, {MAX_CLASSES}]")
        if not 0.1 <= self.min_object <= self.max_object <= 0.95:
            raise ValueError("need 0.1 <= min_object <= max_object <= 0.95")


def class_parts(label: int) -> tuple[str, str, str]:
    """``(shape, texture, palette)`` of class ``label``; consecutive classes differ in shape first,
    so any number of classes up to 120 covers every shape."""
    shape = SHAPES[label % len(SHAPES)]
    texture = TEXTURES[(label // len(SHAPES)) % len(TEXTURES)]
    palette = list(PALETTES)[label // (len(SHAPES) * len(TEXTURES))]
    return shape, texture, palette


def class_names(num_classes: int) -> list[str]:
    return ["-".join(class_parts(k)) for k in range(num_classes)]


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _half_planes(u: np.ndarray, v: np.ndarray, sides: int, apothem: float, turn: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = turn + 2 * math.pi * k / sides
        inside &= u * math.cos(a) + v * math.sin(a) <= apothem
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shape in object coordinates (``u, v`` in about [-1, 1])."""
    r = np.hypot(u, v)
    if shape == "flower":
        return r <= 0.62 + 0.38 * np.cos(5 * np.arctan2(v, u))
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if shape == "crescent":
        return (r <= 1) & (np.hypot(u - 0.45, v) > 0.78)
    if shape == "triangle":
        return _half_planes(u, v, 3, 0.5, math.pi / 2)
    if shape == "hexagon":
        return _half_planes(u, v, 6, 0.87, 0.0)
    if shape == "rhombus":
        return np.abs(u) + 1.7 * np.abs(v) <= 1
    if shape == "ring":
        return (r <= 1) & (r >= 0.5)
    if shape == "arrow":
        shaft = (np.abs(v) <= 0.22) & (u >= -1) & (u <= 0.15)
        head = (u >= 0.15) & (u <= 1) & (np.abs(v) <= (1 - u) * 0.75)
        return shaft | head
    raise ValueError(f"unknown shape {shape!r}")


def texture_weight(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the second colour shows, in [0, 1] (object coordinates, ``period`` in the same units)."""
    f = 2 * math.pi / period
    if texture == "stripes":
        return (np.sin(u * f) > 0).astype(np.float32)
    if texture == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return (np.hypot(du, dv) <= 0.28).astype(np.float32)
    if texture == "rings":
        return (np.sin(np.hypot(u, v) * f) > 0).astype(np.float32)
    if texture == "waves":
        return (np.sin(u * f + 2.0 * np.sin(v * f * 0.5)) > 0).astype(np.float32)
    if texture == "gradient":
        return np.clip((u + 1) / 2, 0, 1).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


@dataclass
class PretrainSample:
    image: np.ndarray  # [H, W, 3] uint8
    label: int
    box: tuple[int, int, int, int]
    mask: np.ndarray  # [H, W] bool


class SyntheticPretrainTask:
    """The generator. ``sample(split, index)`` is a pure function of the seed, split, index and config."""

    def __init__(self, config: PretrainTaskConfig = PretrainTaskConfig(), seed: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        s = config.size
        self._yy, self._xx = np.mgrid[0:s, 0:s].astype(np.float32)

    def label_of(self, index: int) -> int:
        return index % self.config.num_classes

    def _rng(self, split: str, index: int) -> np.random.Generator:
        # A salt apart from the WSOL benchmark's, so equal seeds never share a random stream.
        return np.random.default_rng([self.seed, zlib.crc32(split.encode()), int(index), 0x9E7])

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.config.size
        low = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.float32)
        low = 0.55 * low + 0.45 * low.mean(axis=2, keepdims=True)  # mostly grey, some colour
        # Bilinear upsampling of the 3 x 3 field by separable interpolation.
        pos = np.clip((np.arange(s, dtype=np.float32) + 0.5) * (3 / s) - 0.5, 0, 2)
        lo = np.minimum(np.floor(pos).astype(int), 1)
        frac = (pos - lo)[:, None]
        rows = low[lo] * (1 - frac[:, :, None]) + low[lo + 1] * frac[:, :, None]  # [s, 3, 3]
        img = rows[:, lo] * (1 - frac[None, :, :]) + rows[:, lo + 1] * frac[None, :, :]
        img = np.ascontiguousarray(img, dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):  # low-saturation bars: clutter without class evidence
            h, w = (max(2, int(rng.uniform(0.03, 0.12) * s)), max(4, int(rng.uniform(0.15, 0.5) * s)))
            if rng.random() < 0.5:
                h, w = w, h
            y0, x0 = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            img[y0 : y0 + h, x0 : x0 + w] = _rgb(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.2, 0.9))
        img += rng.standard_normal((s, s, 1), dtype=np.float32) * rng.uniform(2, 8)
        return img

    def sample(self, split: str, index: int) -> PretrainSample:
        cfg, s = self.config, self.config.size
        rng = self._rng(split, index)
        label = self.label_of(index)
        shape, texture, palette = class_parts(label)
        img = self._background(rng)

        side = rng.uniform(cfg.min_object, cfg.max_object) * s
        aspect = rng.uniform(0.7, 1.4)
        half_u, half_v = side / 2 * math.sqrt(aspect), side / 2 / math.sqrt(aspect)
        angle = rng.uniform(0, 2 * math.pi)
        reach = int(math.ceil(max(half_u, half_v))) + 1
        cx = rng.uniform(min(reach, s / 2), max(s - reach, s / 2))
        cy = rng.uniform(min(reach, s / 2), max(s - reach, s / 2))
        x0, x1 = max(0, int(cx) - reach), min(s, int(cx) + reach + 1)
        y0, y1 = max(0, int(cy) - reach), min(s, int(cy) + reach + 1)
        dx, dy = self._xx[y0:y1, x0:x1] - cx, self._yy[y0:y1, x0:x1] - cy
        ca, sa = math.cos(angle), math.sin(angle)
        u = (dx * ca + dy * sa) / half_u
        v = (-dx * sa + dy * ca) / half_v
        inside = shape_mask(shape, u, v)
        if not inside.any():  # too small to draw a pixel: a dot at the centre keeps the box valid
            inside[(y1 - y0) // 2, (x1 - x0) // 2] = True

        low, high = PALETTES[palette]
        first = _rgb(rng.uniform(low, high), rng.uniform(0.55, 0.95), rng.uniform(0.65, 0.98))
        second = _rgb(rng.uniform(low, high), rng.uniform(0.3, 0.8), rng.uniform(0.12, 0.4))
        weight = texture_weight(texture, u, v, period=rng.uniform(0.25, 0.5))[..., None]
        shade = 1.0 + 0.15 * (u * math.cos(angle) + v * math.sin(angle))[..., None]
        pixels = (first * (1 - weight) + second * weight) * shade
        window = img[y0:y1, x0:x1]
        np.copyto(window, pixels, where=inside[..., None])

        mask = np.zeros((s, s), dtype=bool)
        mask[y0:y1, x0:x1] = inside
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1]))
        return PretrainSample(np.clip(img, 0, 255).astype(np.uint8), label, box, mask)

    def encode(self, sample: PretrainSample, image_id: str, with_mask: bool) -> EncodedSample:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(sample.image).save(buf, format="JPEG", quality=self.config.jpeg_quality)
        h, w = sample.mask.shape
        return EncodedSample(
            image=buf.getvalue(),
            image_ext="jpg",
            json=meta_json(image_id, sample.label, w, h, [sample.box]),
            cls=str(sample.label).encode(),
            mask_png=encode_mask_png(sample.mask) if with_mask else None,
        )


@dataclass(frozen=True)
class PretrainRecord:
    image_id: str
    split: str
    index: int
    size_hint: int = 0


@dataclass(frozen=True)
class PretrainMaterializer:
    """Generates and encodes a record's image inside a writer process."""

    config: PretrainTaskConfig
    seed: int
    with_masks: bool

    def fingerprint(self) -> str:
        return f"synthetic-pretrain:{sorted(asdict(self.config).items())}:seed={self.seed}:masks={self.with_masks}"

    def __call__(self, record: PretrainRecord, key: str) -> EncodedSample:
        task = self.__dict__.get("_task")
        if task is None:  # built once per writer process, never pickled
            task = SyntheticPretrainTask(self.config, self.seed)
            object.__setattr__(self, "_task", task)
        return task.encode(task.sample(record.split, record.index), record.image_id, self.with_masks)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_task"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def write_pretrain_task(
    out_dir: str | Path,
    *,
    num_train: int,
    num_val: int,
    num_test: int,
    config: PretrainTaskConfig = PretrainTaskConfig(),
    seed: int = 0,
    mask_splits: Sequence[str] = ("val", "test"),
    options: WriterOptions | None = None,
) -> dict[str, WriteResult]:
    """Write ``out_dir/{train,val,test}`` shards of the pretraining task (resumable, like every writer run)."""
    opts = options or WriterOptions(shard_max_samples=2000, shard_max_bytes=None, progress=False)
    results = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        masks = split in mask_splits
        results[split] = write_split(
            out_dir,
            split,
            [PretrainRecord(f"{split}_{i:07d}", split, i) for i in range(count)],
            PretrainMaterializer(config, seed, masks),
            dataset="synthetic-pretrain",
            num_classes=config.num_classes,
            class_names=class_names(config.num_classes),
            has_masks=masks,
            options=opts,
        )
    return results
