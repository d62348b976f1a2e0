"""A synthetic WSOL benchmark that shows the field's classic failure, small enough for a CPU.

Each image (default 128 x 128 px, one object) shows a "creature" on a cluttered background:

* **The object** is a *body* (a filled ellipse, random size, elongation and orientation) with a
  *part* attached to its rim (a disc, like a bird's head, with a dark "eye" dot). The object's
  bounding box side is 30-70 % of the image side; the part's diameter is about 30 % of it, so the
  part covers well under a tenth of the object's box.
* **What defines a class.** The part carries the strong evidence: each class has its own part
  colour (saturated hues evenly spaced on the colour wheel) and, beyond 12 classes, its own part
  pattern (solid, ring, half-and-half). The body carries weaker but real evidence: with
  probability ``body_evidence`` (0.6) it has its class's body colour (a muted hue between two part
  hues), otherwise the body colour of a random class. So the part alone classifies perfectly, the
  body alone only about ``body_evidence + (1 - body_evidence) / K`` of the time.
* **Orientation.** By default every orientation is equally likely: the body's axis, where the part
  sits on its rim, the shading, the background grating. A rotated image is then as likely as the
  original, so a rotation pretext task (CAML) can only be solved from the one oriented thing left,
  the apex-up distractor triangles of the background. ``upright=True`` gives the creatures a
  canonical pose, as in photographs: the body lies within ``UPRIGHT_TILT`` of horizontal, the
  part sits on the upper half of the rim and the light comes from above, so the object itself
  tells which way is up.
* **Body texture.** By default a body's surface (its colour with shading and faint noise) is
  statistically close to the background's, so only the part stands out from everything else in a
  class-agnostic way, and a map trained to separate "object" from "background" across images
  (C2AM) settles on the part. ``body_texture=True`` gives every body, whatever its class, a
  checker of "scales" that nothing else in the picture has: the whole object becomes the
  consistent foreground, as real objects are against their scenes. It carries no class evidence.
* **Clutter.** The background is a smooth low-saturation colour field with an oriented grating
  and pixel noise, plus 2-5 distractor shapes (rectangles, triangles, ellipses). Distractors carry
  no class evidence (low-saturation colours) except that each is, with probability
  ``confusable_prob``, painted in a random class's part colour: confusable evidence that only the
  part's shape and its attachment to a body tell apart.

A classifier trained with image labels learns the part first; its plain CAM then lights up the
part and its box scores low at IoU 0.5 and 0.7 against the whole object's box, while a method that
spreads attention to the body (which does carry evidence) can recover the full extent.

**Ground truth.** The box is the bounding box of the whole object (body and part), inclusive
pixel corners ``x0, y0, x1, y1``; the mask (written as ``mask.png`` for PxAP in evaluation splits)
is exactly the object's pixels, so the box is the mask's bounding box. :class:`SyntheticSample`
also gives the part's box and mask, for tests and analysis.

**Determinism.** Image ``index`` of ``split`` depends only on ``(seed, split, index)`` and the
config, so any subset can be generated in any order by any number of processes. Labels are
balanced (``index % num_classes``). Drawing is vectorized numpy on small windows and the JPEG is
encoded with PIL at a fixed quality: thousands of images per second per core at 128 px.
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

SPLITS = ("train", "val", "test")
_PATTERNS = ("solid", "ring", "half")
_MAX_HUES = 12
#: Largest tilt of an upright body's long axis from horizontal (radians).
UPRIGHT_TILT = math.radians(20)
#: Half the brightness step of the body checker (0-255 scale).
BODY_TEXTURE_CONTRAST = 28.0
#: Options added after the first release: they join a dataset's identity only when set, so
#: datasets generated before them keep their fingerprint and cache directory.
LATER_OPTIONS = ("upright", "body_texture")


@dataclass(frozen=True)
class SyntheticConfig:
    """Options of the generator (all of them shape the pixels, so all are in shard fingerprints)."""

    size: int = 128
    num_classes: int = 10
    #: Object bounding-box side (its longer side) as a fraction of the image side.
    min_object: float = 0.3
    max_object: float = 0.7
    #: Part diameter as a fraction of the object's box side.
    part_scale: float = 0.3
    #: Probability that the body has its own class's colour (weaker evidence than the part).
    body_evidence: float = 0.6
    min_distractors: int = 2
    max_distractors: int = 5
    #: Probability that a distractor is painted in a (random) class's part colour.
    confusable_prob: float = 0.25
    jpeg_quality: int = 90
    #: Write labels as -1 (co-localization); the pictures are the same.
    unlabeled: bool = False
    #: Creatures in a canonical pose (see the module docstring); False draws every orientation.
    upright: bool = False
    #: Every body wears the same checker texture (see the module docstring).
    body_texture: bool = False

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError("synthetic size must be >= 32 px")
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if not 0.05 <= self.min_object <= self.max_object <= 0.95:
            raise ValueError("need 0.05 <= min_object <= max_object <= 0.95")
        if not 0.05 <= self.part_scale <= 0.6:
            raise ValueError("part_scale must be in [0.05, 0.6]")
        if not 0.0 <= self.body_evidence <= 1.0 or not 0.0 <= self.confusable_prob <= 1.0:
            raise ValueError("probabilities must be in [0, 1]")
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError("need 0 <= min_distractors <= max_distractors")


@dataclass
class SyntheticSample:
    """One generated image with its ground truth (boxes are inclusive ``x0, y0, x1, y1``)."""

    image: np.ndarray  # [H, W, 3] uint8
    label: int
    box: tuple[int, int, int, int]
    part_box: tuple[int, int, int, int]
    mask: np.ndarray  # [H, W] bool, the whole object
    part_mask: np.ndarray  # [H, W] bool, the part only


def config_key(config: SyntheticConfig) -> dict:
    """The options that identify a generated dataset (:data:`LATER_OPTIONS` only when set)."""
    return {k: v for k, v in asdict(config).items() if v or k not in LATER_OPTIONS}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _bbox(mask: np.ndarray, x_off: int = 0, y_off: int = 0) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return (int(xs[0]) + x_off, int(ys[0]) + y_off, int(xs[-1]) + x_off, int(ys[-1]) + y_off)


class SyntheticWSOL:
    """The generator. ``sample(split, index)`` is a pure function of the seed, split, index and config."""

    def __init__(self, config: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> None:
        self.config = config
        self.seed = int(seed)
        k = config.num_classes
        self.num_hues = min(k, _MAX_HUES)
        self.part_colors = np.stack([_hsv(c / self.num_hues, 0.95, 0.95) for c in range(self.num_hues)])
        # Body hues sit between part hues and are muted: they never look like a part.
        self.body_colors = np.stack([_hsv((c + 0.5) / k, 0.5, 0.6) for c in range(k)])
        s = config.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        self._yy, self._xx = yy, xx
        self._axis = np.arange(s, dtype=np.float32)
        # Bilinear interpolation weights from a 4-point grid to s pixels (align-corners=False).
        pos = np.clip((self._axis + 0.5) * (4 / s) - 0.5, 0, 3)
        lo = np.minimum(np.floor(pos).astype(int), 2)
        frac = pos - lo
        interp = np.zeros((s, 4), dtype=np.float32)
        interp[np.arange(s), lo] = 1 - frac
        interp[np.arange(s), lo + 1] = frac
        self._interp = interp
        # A fixed noise field (depends on the seed only); images take random windows of it.
        self._noise = np.random.default_rng([self.seed, 0x0015E]).standard_normal((2 * s, 2 * s), dtype=np.float32)

    # -- class definition --------------------------------------------------------------------

    def label_of(self, index: int) -> int:
        return index % self.config.num_classes

    def part_style(self, label: int) -> tuple[np.ndarray, str]:
        """The class's part colour and pattern."""
        return self.part_colors[label % self.num_hues], _PATTERNS[(label // self.num_hues) % len(_PATTERNS)]

    def _rng(self, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(split.encode()), int(index)])

    # -- drawing -----------------------------------------------------------------------------

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s = self.config.size
        gray = rng.uniform(70, 200, size=(4, 4, 1))
        tint = rng.uniform(-22, 22, size=(4, 4, 3))
        low = (gray + tint).astype(np.float32)
        # Bilinear upsampling of the 4x4 colour field as two small matrix products.
        rows = (self._interp @ low.reshape(4, 12)).reshape(s, 4, 3)
        img = np.matmul(self._interp[None], rows)  # [s, s, 3], C-contiguous
        # An oriented grating sin(kx x + ky y + p) = sin(kx x) cos(ky y + p) + cos(kx x) sin(ky y + p):
        # two outer products instead of a transcendental per pixel.
        theta = rng.uniform(0, math.pi)
        k = 2 * math.pi * rng.uniform(0.05, 0.3)
        amp = rng.uniform(6, 20)
        phase = rng.uniform(0, 2 * math.pi)
        ax = self._axis * (k * math.cos(theta))
        ay = self._axis * (k * math.sin(theta)) + phase
        grating = np.outer(np.cos(ay), np.sin(ax))
        grating += np.outer(np.sin(ay), np.cos(ax))
        grating *= amp
        grating += self._noise_patch(rng, s, s) * rng.uniform(2, 7)
        img += grating[..., None]
        return img

    def _noise_patch(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """A random window of a fixed unit-variance noise field (cheaper than fresh normals)."""
        oy = int(rng.integers(0, self._noise.shape[0] - h + 1))
        ox = int(rng.integers(0, self._noise.shape[1] - w + 1))
        return self._noise[oy : oy + h, ox : ox + w]

    def _distractors(self, rng: np.random.Generator, img: np.ndarray) -> None:
        cfg, s = self.config, self.config.size
        for _ in range(int(rng.integers(cfg.min_distractors, cfg.max_distractors + 1))):
            w = max(3, int(rng.uniform(0.06, 0.2) * s))
            h = max(3, int(rng.uniform(0.06, 0.2) * s))
            x0 = int(rng.integers(0, s - w))
            y0 = int(rng.integers(0, s - h))
            yy = self._yy[y0 : y0 + h, x0 : x0 + w] - y0
            xx = self._xx[y0 : y0 + h, x0 : x0 + w] - x0
            kind = int(rng.integers(0, 3))
            if kind == 0:  # rectangle
                m = np.ones((h, w), dtype=bool)
            elif kind == 1:  # triangle (apex up)
                m = np.abs(xx - w / 2) <= (yy + 1) * (w / 2) / h
            else:  # ellipse
                m = ((xx - w / 2 + 0.5) / (w / 2)) ** 2 + ((yy - h / 2 + 0.5) / (h / 2)) ** 2 <= 1.0
            if kind != 2 and rng.random() < cfg.confusable_prob:
                # Confusable evidence: a part colour on an angular shape (a part is a disc with
                # an eye on a body; only that shape and context tell the two apart).
                color = self.part_colors[int(rng.integers(0, self.num_hues))]
            else:
                color = _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.9))
            np.copyto(img[y0 : y0 + h, x0 : x0 + w], color, where=m[..., None])

    def sample(self, split: str, index: int) -> SyntheticSample:
        """Generate image ``index`` of ``split``."""
        cfg, s = self.config, self.config.size
        rng = self._rng(split, index)
        label = self.label_of(index)
        img = self._background(rng)
        self._distractors(rng, img)

        # Shape at unit scale: body semi-axes (1, b), rotated by alpha; part on the rim at angle phi.
        # Upright draws from narrower ranges with the same number of draws, so that the default's
        # pictures do not change. Image y grows downward: the upper rim is sin(phi) < 0.
        b = rng.uniform(0.45, 0.8)
        alpha = rng.uniform(-UPRIGHT_TILT, UPRIGHT_TILT) if cfg.upright else rng.uniform(0, math.pi)
        phi = rng.uniform(-5 * math.pi / 6, -math.pi / 6) if cfg.upright else rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(alpha), math.sin(alpha)
        rim = np.array([math.cos(phi), b * math.sin(phi)])  # in body coordinates
        normal = np.array([b * math.cos(phi), math.sin(phi)])
        normal /= np.linalg.norm(normal)
        ex = math.sqrt(ca**2 + (b * sa) ** 2)
        ey = math.sqrt(sa**2 + (b * ca) ** 2)
        # Scale so that the whole object's box side is the drawn fraction of the image.
        target = rng.uniform(cfg.min_object, cfg.max_object) * s
        r_rel = 0.0
        for _ in range(3):  # the part radius depends on the scale, which depends on the part: iterate
            pc = rim + 0.5 * r_rel * normal
            pcx, pcy = ca * pc[0] - sa * pc[1], sa * pc[0] + ca * pc[1]
            w_rel = max(ex, pcx + r_rel) - min(-ex, pcx - r_rel)
            h_rel = max(ey, pcy + r_rel) - min(-ey, pcy - r_rel)
            scale = target / max(w_rel, h_rel)
            r_rel = cfg.part_scale * target / 2 / scale
        a_px, b_px, r_px = scale, b * scale, r_rel * scale
        pc = (rim + 0.5 * r_rel * normal) * scale
        pcx, pcy = ca * pc[0] - sa * pc[1], sa * pc[0] + ca * pc[1]
        left = min(-ex * scale, pcx - r_px)
        right = max(ex * scale, pcx + r_px)
        top = min(-ey * scale, pcy - r_px)
        bottom = max(ey * scale, pcy + r_px)
        # Place the object at random, fully inside the image.
        cx = rng.uniform(-left + 1, s - 2 - right) if s - 2 - right > -left + 1 else s / 2
        cy = rng.uniform(-top + 1, s - 2 - bottom) if s - 2 - bottom > -top + 1 else s / 2
        wx0 = max(0, int(math.floor(cx + left)) - 1)
        wx1 = min(s, int(math.ceil(cx + right)) + 2)
        wy0 = max(0, int(math.floor(cy + top)) - 1)
        wy1 = min(s, int(math.ceil(cy + bottom)) + 2)
        yy = self._yy[wy0:wy1, wx0:wx1] - cy
        xx = self._xx[wy0:wy1, wx0:wx1] - cx

        u = xx * ca + yy * sa  # body coordinates
        v = -xx * sa + yy * ca
        body = (u / a_px) ** 2 + (v / b_px) ** 2 <= 1.0
        dx, dy = xx - pcx, yy - pcy
        d2 = dx * dx + dy * dy
        part = d2 <= r_px * r_px

        body_class = label if rng.random() < cfg.body_evidence else int(rng.integers(0, cfg.num_classes))
        # The shading brightens towards shade_dir; upright: lit from above.
        shade_dir = rng.uniform(-2 * math.pi / 3, -math.pi / 3) if cfg.upright else rng.uniform(0, 2 * math.pi)
        shade = 1.0 + 0.18 * (xx * math.cos(shade_dir) + yy * math.sin(shade_dir)) / max(a_px, 1.0)
        spots = self._noise_patch(rng, *xx.shape) * 6.0
        window = img[wy0:wy1, wx0:wx1]
        body_pix = self.body_colors[body_class][None, None, :] * shade[..., None] + spots[..., None]
        if cfg.body_texture:
            # Scales: a checker in body coordinates (it turns with the body), period s/24 px.
            # Deterministic, so it draws nothing from rng: the other pixels are as without it.
            freq = 2 * math.pi / (s / 24)
            body_pix += (BODY_TEXTURE_CONTRAST * np.sign(np.sin(u * freq) * np.sin(v * freq)))[..., None]
        # copyto(where=) is several times faster than boolean-index assignment.
        np.copyto(window, body_pix, where=body[..., None])

        color, pattern = self.part_style(label)
        part_pix = np.empty(xx.shape + (3,), dtype=np.float32)
        part_pix[...] = color
        if pattern == "ring":
            np.copyto(part_pix, np.float32(245.0), where=(d2 <= (0.55 * r_px) ** 2)[..., None])
        elif pattern == "half":
            side = (dx * math.cos(alpha) + dy * math.sin(alpha)) > 0
            np.copyto(part_pix, 255.0 - color, where=side[..., None])
        # The eye: the same for every class, so it is structure, not evidence.
        ex_, ey_ = pcx + 0.45 * r_px * normal[0], pcy + 0.45 * r_px * normal[1]
        eye = (xx - ex_) ** 2 + (yy - ey_) ** 2 <= (0.22 * r_px) ** 2
        np.copyto(part_pix, np.float32(20.0), where=eye[..., None])
        np.copyto(window, part_pix, where=part[..., None])

        image = np.clip(img, 0, 255).astype(np.uint8)
        obj = body | part
        mask = np.zeros((s, s), dtype=bool)
        mask[wy0:wy1, wx0:wx1] = obj
        part_mask = np.zeros((s, s), dtype=bool)
        part_mask[wy0:wy1, wx0:wx1] = part
        return SyntheticSample(
            image=image,
            label=-1 if cfg.unlabeled else label,
            box=_bbox(obj, wx0, wy0),
            part_box=_bbox(part, wx0, wy0),
            mask=mask,
            part_mask=part_mask,
        )

    def encode(self, sample: SyntheticSample, image_id: str, with_mask: bool) -> EncodedSample:
        """The shard members of a generated sample (JPEG at the config's quality)."""
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


# ---------------------------------------------------------------------------------------------
# Writing synthetic splits
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticRecord:
    """A generated image to write: its split and index."""

    image_id: str
    split: str
    index: int
    size_hint: int = 0


@dataclass(frozen=True)
class SyntheticMaterializer:
    """Generates and encodes a record's image inside a writer process."""

    config: SyntheticConfig
    seed: int
    with_masks: bool

    def fingerprint(self) -> str:
        return f"synthetic:{sorted(config_key(self.config).items())}:seed={self.seed}:masks={self.with_masks}"

    def __call__(self, record: SyntheticRecord, key: str) -> EncodedSample:
        # The generator's precomputed grids are built once per process and kept on this object
        # (not pickled: each writer process rebuilds them).
        gen = self.__dict__.get("_gen")
        if gen is None:
            gen = SyntheticWSOL(self.config, self.seed)
            object.__setattr__(self, "_gen", gen)
        return gen.encode(gen.sample(record.split, record.index), record.image_id, self.with_masks)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_gen"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def synthetic_records(split: str, count: int) -> list[SyntheticRecord]:
    return [SyntheticRecord(f"{split}_{i:07d}", split, i) for i in range(count)]


def class_names(num_classes: int) -> list[str]:
    return [f"class_{k:03d}" for k in range(num_classes)]


def write_synthetic(
    out_dir: str | Path,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    num_test: int = 300,
    config: SyntheticConfig = SyntheticConfig(),
    seed: int = 0,
    mask_splits: Sequence[str] = ("val", "test"),
    options: WriterOptions | None = None,
) -> dict[str, WriteResult]:
    """Write ``out_dir/{train,val,test}`` shards of the synthetic benchmark.

    Resumable like every writer run: calling it again on a finished directory only re-hashes the
    shards and rewrites nothing, so it doubles as "make sure the embedded dataset exists".
    Evaluation splits get ``mask.png`` members (PxAP); training splits do not need them.
    """
    opts = options or WriterOptions(shard_max_samples=1000, shard_max_bytes=None, progress=False)
    results = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        if count <= 0:
            continue
        masks = split in mask_splits
        results[split] = write_split(
            out_dir,
            split,
            synthetic_records(split, count),
            SyntheticMaterializer(config, seed, masks),
            dataset="synthetic",
            num_classes=config.num_classes,
            class_names=class_names(config.num_classes),
            labeled=not config.unlabeled,
            has_masks=masks,
            options=opts,
        )
    return results
