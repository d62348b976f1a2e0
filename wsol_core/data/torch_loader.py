"""The torch fallback: the ``webdataset`` library's tar reading, PIL decoding, torch DataLoader workers.

Same :class:`~wsol_core.data.batch.Batch`, same :class:`~wsol_core.data.contract.EpochPlan` (which
slice each rank reads, how many batches it yields, padding and dropping), same checks and skip
policy as the DALI loader; only the machinery differs:

Imports happen at module import, once in the parent, so forked workers start without paying
for them again.

* the rank's slice is split into one contiguous run of samples per worker process; a worker
  seeks straight to its first sample's tar header (offsets from the index files) and reads on with
  :func:`webdataset.tariterators.tar_file_iterator` and :func:`~webdataset.tariterators.group_by_keys`,
  keeping only the members it knows (image, ``json``, ``cls``, masks) as bytes: nothing in a
  shard is ever unpickled or auto-decoded;
* training shuffles each worker's stream with webdataset's seeded buffer shuffle;
* images are decoded and resized / cropped / flipped with PIL in the workers: the very operations
  of the protocol's reference loader (``transforms.Resize`` on PIL images, bilinear), so this path
  reproduces its pixels exactly (torchvision's own decoders are deprecated in favour of TorchCodec,
  which is not a dependency); the main process normalizes whole uint8 batches on the device;
* workers are persistent (started once per loader); the epoch reaches them through a shared
  value, so ``set_epoch`` needs no restart.

Workers never raise on bad samples: they send an error record, and the main process raises the
same :class:`~wsol_core.data.format.ShardError` the DALI loader would (or counts the skip).
"""

from __future__ import annotations

import gc
import io
import logging
import math
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from wsol_core.data.batch import Batch
from wsol_core.data.contract import (
    EpochPlan,
    LoaderOptions,
    SkipReport,
    SplitKind,
    load_pseudo_boxes,
    make_batch,
    resolve_load_masks,
)
from wsol_core.data.format import (
    IndexedSample,
    SampleMeta,
    ShardError,
    decode_jpeg_strict,
    encoded_image_problem,
    jpeg_entropy_problem,
    parse_meta,
    protocol_mask,
    strict_decode_failure,
)
from wsol_core.data.manifest import VerifiedSplit

log = logging.getLogger(__name__)

#: Samples a worker sends per message (fewer, larger messages: less IPC overhead).
_CHUNK = 16


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive samples of one tar: where its first header is and the expected keys."""

    tar: str
    header_offset: int
    keys: tuple[str, ...]


@dataclass(frozen=True)
class _Geometry:
    """Where one training or evaluation image comes from, drawn in the worker from its seeded
    generator, applied either there (PIL) or on the device after decoding (``decode="device"``):
    cut ``pre_crop`` (top, left, h, w) out of the source (None: all of it), resize to ``resize``
    (h, w), cut ``post_crop`` (top, left, h, w) out of that (None: all of it), then mirror."""

    pre_crop: tuple[int, int, int, int] | None
    resize: tuple[int, int]
    post_crop: tuple[int, int, int, int] | None
    flip: bool

    def view(self, width: int, height: int) -> tuple[float, float, float, float, float]:
        """The window of the ``width x height`` source the output shows (``Batch.views``)."""
        if self.pre_crop is not None:
            top, left, h, w = self.pre_crop
            x0, y0, x1, y1 = float(left), float(top), float(left + w), float(top + h)
        else:
            x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
        if self.post_crop is not None:  # a crop of the resized picture, in source pixels
            top, left, h, w = self.post_crop
            sx, sy = (x1 - x0) / self.resize[1], (y1 - y0) / self.resize[0]
            x0, y0, x1, y1 = x0 + left * sx, y0 + top * sy, x0 + (left + w) * sx, y0 + (top + h) * sy
        return x0, y0, x1, y1, float(self.flip)


@dataclass
class _Item:
    """One sample out of a worker: a transformed image and its metadata, or an error.

    With ``decode="device"`` the image is not decoded in the worker: ``encoded`` holds the JPEG
    bytes (or ``decoded`` the ``[3, H, W]`` pixels of a PNG, which nvJPEG does not read), and
    ``geometry`` the transform the main process applies on the device."""

    image: torch.Tensor | None  # [H, W, 3] uint8
    meta: SampleMeta | None
    mask: np.ndarray | None
    error: ShardError | None
    #: A structural error (unreadable tar): raised even with skip_corrupt.
    fatal: bool = False
    encoded: torch.Tensor | None = None  # [N] uint8 JPEG bytes
    decoded: torch.Tensor | None = None  # [3, H, W] uint8
    geometry: _Geometry | None = None
    shard: str = ""


def _segments(split: VerifiedSplit, start: int, stop: int, cache: dict[str, list[IndexedSample]]) -> list[_Segment]:
    """The tar runs covering global samples ``[start, stop)`` (index files parsed once per worker)."""
    out = []
    pos = start
    while pos < stop:
        shard, local = split.locate(pos)
        if str(shard.idx) not in cache:
            if len(cache) >= 4:  # a worker reads a few shards per epoch; keep memory bounded
                cache.pop(next(iter(cache)))
            cache[str(shard.idx)] = shard.index()
        take = min(stop - pos, shard.num_samples - local)
        samples = cache[str(shard.idx)][local : local + take]
        out.append(_Segment(str(shard.tar), samples[0].header_offset, tuple(s.key for s in samples)))
        pos += take
    return out


def _split_range(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    n = stop - start
    return [(start + n * i // parts, start + n * (i + 1) // parts) for i in range(parts)]


class _ShardStream(IterableDataset):
    """Yields chunks of transformed samples of this rank's slice; one contiguous run per worker."""

    def __init__(
        self,
        split: VerifiedSplit,
        kind: SplitKind,
        rank: int,
        world_size: int,
        batch_size: int,
        options: LoaderOptions,
        load_masks: bool,
        epoch_value,
    ) -> None:
        super().__init__()
        self.split = split
        self.kind = kind
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.options = options
        self.load_masks = load_masks
        self.epoch_value = epoch_value  # multiprocessing.Value: set_epoch reaches persistent workers
        self._index_cache: dict[str, list[IndexedSample]] = {}  # per worker process

    def plan(self) -> EpochPlan:
        return EpochPlan(
            self.split.num_samples, self.batch_size, self.rank, self.world_size, int(self.epoch_value.value), self.kind
        )

    def __iter__(self) -> Iterator[list[_Item]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan()
        lo, hi = _split_range(plan.start, plan.stop, workers)[worker]
        rng = random.Random(plan.seed(self.options.seed, 1000 + worker))
        samples = self._read(_segments(self.split, lo, hi, self._index_cache))
        if plan.kind == "train":
            buf = max(1, self.options.shuffle_buffer // workers)
            samples = wds.filters.shuffle(bufsize=buf, initial=buf, rng=rng)(samples)
        chunk: list[_Item] = []
        try:
            for sample in samples:
                chunk.append(self._transform(sample, rng, plan.kind))
                if len(chunk) == _CHUNK:
                    yield chunk
                    chunk = []
        except ShardError as err:  # the tar itself is unreadable: sent, then raised by the main process
            chunk.append(_Item(None, None, None, err, fatal=True))
        if chunk:
            yield chunk

    # -- reading -----------------------------------------------------------------------------

    def _read(self, segments: list[_Segment]) -> Iterator[dict]:
        wanted = {"jpg", "jpeg", "png", "json", "cls"} | ({"mask.png", "ignore.png"} if self.load_masks else set())
        for seg in segments:
            with open(seg.tar, "rb") as f:
                f.seek(seg.header_offset)
                members = (
                    dict(m, __url__=seg.tar)
                    for m in tar_file_iterator(f, select_files=lambda name: name.split(".", 1)[-1] in wanted)
                )
                grouped = group_by_keys(members, lcase=False)
                n = 0
                try:
                    for expected in seg.keys:
                        sample = next(grouped, None)
                        if sample is None:
                            raise ShardError(seg.tar, expected, "tar ends before this sample: truncated tar?")
                        if sample["__key__"] != expected:
                            raise ShardError(
                                seg.tar, expected, f"tar holds {sample['__key__']!r} where the index says {expected!r}"
                            )
                        sample["__shard__"] = seg.tar
                        yield sample
                        n += 1
                except ShardError:
                    raise
                except Exception as exc:  # tarfile.ReadError and friends on a damaged tar
                    key = seg.keys[n] if n < len(seg.keys) else None
                    raise ShardError(seg.tar, key, f"cannot read the tar ({type(exc).__name__}: {exc})") from None
                finally:
                    grouped.close()

    # -- decoding and transforms -------------------------------------------------------------

    def _transform(self, sample: dict, rng: random.Random, kind: SplitKind) -> _Item:
        shard, key = sample["__shard__"], sample["__key__"]
        manifest = self.split.manifest
        try:
            ext = next((e for e in ("jpg", "jpeg", "png") if e in sample), None)
            if ext is None:
                raise ShardError(shard, key, "missing image (jpg/png) member")
            data = sample[ext]
            problem = encoded_image_problem(data, ext)
            if problem:
                raise ShardError(shard, key, problem)
            meta = parse_meta(
                sample.get("json"),
                sample.get("cls"),
                shard=shard,
                key=key,
                labeled=manifest.labeled,
                num_classes=manifest.num_classes,
            )
            try:
                pil = Image.open(io.BytesIO(data))  # reads the header only
                size = pil.size
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad data
                raise ShardError(shard, key, f"cannot decode image ({type(exc).__name__}: {exc})") from None
            if size != (meta.width, meta.height):
                raise ShardError(
                    shard, key, f"image is {size[0]}x{size[1]} but its json says {meta.width}x{meta.height}"
                )
            geometry = self._geometry(meta.height, meta.width, rng, kind)
            mask = None
            if self.load_masks:
                mask = protocol_mask(
                    sample.get("mask.png"), sample.get("ignore.png"), size=self.options.mask_size, shard=shard, key=key
                )
            strict = pil.format == "JPEG" and self.options.jpeg_check == "strict"
            if self.options.decode == "device" and pil.format == "JPEG":
                problem = jpeg_entropy_problem(data) if strict else None
                if problem:
                    raise ShardError(shard, key, problem)
                return _Item(
                    None,
                    meta,
                    mask,
                    None,
                    encoded=torch.frombuffer(bytearray(data), dtype=torch.uint8),
                    geometry=geometry,
                    shard=shard,
                )
            try:
                # A strict decode's pixels are PIL's own (format.decode_jpeg_strict), so checking
                # the entropy data costs nothing here; None: a CMYK JPEG, converted by PIL.
                rgb = decode_jpeg_strict(data) if strict else None
            except Exception as exc:
                raise ShardError(shard, key, strict_decode_failure(exc)) from None
            try:
                if rgb is not None:
                    img = Image.fromarray(rgb)
                else:
                    pil.load()
                    img = pil if pil.mode == "RGB" else pil.convert("RGB")
            except Exception as exc:
                raise ShardError(shard, key, f"cannot decode image ({type(exc).__name__}: {exc})") from None
            if self.options.decode == "device":  # a PNG: decoded here, transformed on the device
                chw = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
                return _Item(None, meta, mask, None, decoded=chw, geometry=geometry, shard=shard)
            return _Item(_apply_pil(img, geometry), meta, mask, None, geometry=geometry)
        except ShardError as err:
            return _Item(None, None, None, err)

    def _geometry(self, height: int, width: int, rng: random.Random, kind: SplitKind) -> _Geometry:
        """The protocol's transforms as a :class:`_Geometry`, drawn from the worker's generator
        (the same draws, in the same order, for both decode modes)."""
        c, r = self.options.crop_size, self.options.resize_size
        if kind == "eval":
            return _Geometry(None, (c, c), None, False)
        if self.options.random_resized_crop:
            pre_crop: tuple[int, int, int, int] | None = _rrc_params(
                height, width, self.options.rrc_scale, self.options.rrc_ratio, rng
            )
            resize, post_crop = (c, c), None
        else:
            pre_crop, resize = None, (r, r)
            top, left = rng.randint(0, r - c), rng.randint(0, r - c)
            post_crop = (top, left, c, c)
        flip = self.options.hflip and rng.random() < 0.5
        return _Geometry(pre_crop, resize, post_crop, flip)


def _apply_pil(img: Image.Image, g: _Geometry) -> torch.Tensor:
    """The geometry with PIL's bilinear resize: the protocol's reference transform, pixel for pixel."""
    box = None
    if g.pre_crop is not None:
        top, left, h, w = g.pre_crop
        box = (left, top, left + w, top + h)
    img = img.resize((g.resize[1], g.resize[0]), Image.Resampling.BILINEAR, box=box)
    if g.post_crop is not None:
        top, left, h, w = g.post_crop
        img = img.crop((left, top, left + w, top + h))
    if g.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(img, dtype=np.uint8))  # [H, W, 3]


def _apply_tensor(chw: torch.Tensor, g: _Geometry) -> torch.Tensor:
    """The geometry on a decoded ``[3, H, W]`` uint8 image where it lies (the GPU): antialiased
    bilinear resize, rounded back to 8 bits like PIL's. Returns ``[3, h, w]`` float32 in 0-255."""
    if g.pre_crop is not None:
        top, left, h, w = g.pre_crop
        chw = chw[:, top : top + h, left : left + w]
    x = torch.nn.functional.interpolate(
        chw[None].float(), size=g.resize, mode="bilinear", antialias=True, align_corners=False
    )[0]
    if g.post_crop is not None:
        top, left, h, w = g.post_crop
        x = x[:, top : top + h, left : left + w]
    if g.flip:
        x = x.flip(-1)
    return x.round_().clamp_(0, 255)


def _rrc_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters, drawn from our seeded generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Batched JPEG decoding to ``[3, H, W]`` uint8 RGB on ``device`` (nvJPEG on a GPU)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which has no batched
        # nvJPEG image decoding yet and is not a dependency; the GPU machines run torchvision 0.26.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _identity(chunk: list[_Item]) -> list[_Item]:
    return chunk


class TorchLoader:
    """The torch fallback loader (see the module docstring and :mod:`wsol_core.data.loader`)."""

    backend = "torch"

    def __init__(
        self,
        split: VerifiedSplit,
        *,
        split_kind: SplitKind,
        rank: int,
        world_size: int,
        device: torch.device,
        options: LoaderOptions,
    ) -> None:
        self.split = split
        self.kind = split_kind
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.options = options
        self.skipped = SkipReport()
        self.load_masks = resolve_load_masks(split, split_kind, options)
        self.pseudo_boxes = load_pseudo_boxes(split, split_kind, options)
        workers = options.num_threads
        ctx = multiprocessing.get_context(options.worker_start) if workers > 0 else multiprocessing.get_context()
        self._epoch = ctx.Value("q", 0, lock=False)
        self._dataset = _ShardStream(
            split, split_kind, rank, world_size, options.batch_size, options, self.load_masks, self._epoch
        )
        self._loader = DataLoader(
            self._dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=max(2, options.prefetch * options.batch_size // _CHUNK) if workers > 0 else None,
            multiprocessing_context=ctx if workers > 0 else None,
            pin_memory=False,
        )
        mean = torch.tensor(options.mean, dtype=torch.float32) * 255.0
        std = torch.tensor(options.std, dtype=torch.float32) * 255.0
        self._mean, self._std = mean.to(device), std.to(device)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def plan(self) -> EpochPlan:
        return self._dataset.plan()

    def __len__(self) -> int:
        return self.plan().num_batches

    def close(self) -> None:
        """Stop the persistent workers."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` uint8 -> normalized float NCHW (channels_last memory when asked)."""
        x = images.to(self.device, non_blocking=True).float()
        x = ((x - self._mean) / self._std).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        return x if self.options.channels_last else x.contiguous()

    def _decode_on_device(self, items: list[_Item], padding: list[bool]) -> torch.Tensor:
        """``decode="device"``: the batch's JPEGs decoded together by nvJPEG on the GPU
        (``torchvision.io.decode_jpeg(list, device="cuda")``; on the CPU when the loader's device
        is the CPU), then each cropped, resized and flipped where it lies, and normalized as one
        tensor. A JPEG that does not decode is found by decoding the batch's one by one, and
        named (or, with ``skip_corrupt``, counted and replaced by a flagged repeat of a good
        sample of the batch, as in the worker path); ``padding`` is updated in place."""
        jpegs = {id(it): it.encoded for it in items if it.encoded is not None}  # padding repeats one object
        results: dict[int, torch.Tensor | str] = {}
        try:
            results = dict(zip(jpegs, _decode_jpegs(list(jpegs.values()), self.device)))
        except RuntimeError:
            for ident, encoded in jpegs.items():
                try:
                    results[ident] = _decode_jpegs([encoded], self.device)[0]
                except RuntimeError as exc:
                    results[ident] = str(exc).split(",")[-1].strip() or type(exc).__name__
        decoded: dict[int, torch.Tensor] = {}
        failed: list[int] = []
        for i, it in enumerate(items):
            result = results.get(id(it), it.decoded)
            if isinstance(result, torch.Tensor):
                decoded[i] = result.to(self.device, non_blocking=True)
                continue
            err = ShardError(it.shard, it.meta.key if it.meta else None, f"cannot decode image ({result})")
            if not self.options.skip_corrupt:
                raise err
            if not padding[i]:
                self.skipped.add(err)
            failed.append(i)
        if failed:
            if not decoded:
                raise ShardError(self.split.root, None, f"rank {self.rank}: no image of a batch could be decoded")
            good = min(decoded)
            for i in failed:
                items[i], padding[i], decoded[i] = items[good], True, decoded[good]
        out_images = torch.stack([_apply_tensor(decoded[i], it.geometry) for i, it in enumerate(items)])  # type: ignore[arg-type]
        x = (out_images - self._mean[:, None, None]) / self._std[:, None, None]
        return x.contiguous(memory_format=torch.channels_last) if self.options.channels_last else x

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self._iterate()
        except Exception:
            # Stop the workers now: left to the garbage collector (the traceback keeps this loader
            # alive), their shutdown runs in an arbitrary order and waits out a 5 s timeout.
            self.close()
            raise

    def _iterate(self) -> Iterator[Batch]:
        plan = self.plan()
        plan.check(str(self.split.root))
        bsz = plan.batch_size
        skipped_before = self.skipped.total
        items: list[_Item] = []
        padding: list[bool] = []
        last_good: _Item | None = None
        emitted = 0
        if self._loader.num_workers > 0 and getattr(self._loader, "_iterator", None) is None:
            # Workers are about to be forked: collect cyclic garbage here first. A DALI pipeline
            # left for the collector would otherwise be finalized inside a worker, whose copy of
            # DALI's threads does not exist, and hang it.
            gc.collect()
        stream = iter(self._loader)
        exhausted = False
        while emitted < plan.num_batches:
            while len(items) < bsz and not exhausted:
                try:
                    chunk = next(stream)
                except StopIteration:
                    exhausted = True
                    break
                for item in chunk:
                    if item.error is not None:
                        if item.fatal or not self.options.skip_corrupt:
                            raise item.error
                        self.skipped.add(item.error)
                        continue
                    items.append(item)
                    padding.append(False)
                    last_good = item
            if len(items) < bsz:
                # Out of samples (the eval slice's end, or skips): pad with flagged repeats.
                if last_good is None:
                    raise ShardError(self.split.root, None, f"rank {self.rank} has no readable sample to yield")
                while len(items) < bsz:
                    items.append(last_good)
                    padding.append(True)
            batch_items, items = items[:bsz], items[bsz:]
            batch_pad, padding = padding[:bsz], padding[bsz:]
            if self.options.decode == "device":
                images = self._decode_on_device(batch_items, batch_pad)
            else:
                images = self._normalize(torch.stack([it.image for it in batch_items]))  # type: ignore[misc]
            masks = [it.mask for it in batch_items] if self.load_masks else None
            metas = [it.meta for it in batch_items]
            views = [it.geometry.view(m.width, m.height) for it, m in zip(batch_items, metas)]  # type: ignore[union-attr]
            yield make_batch(images, metas, batch_pad, masks, views=views, pseudo_boxes=self.pseudo_boxes)  # type: ignore[arg-type]
            emitted += 1
        del stream
        if self.skipped.total > skipped_before:
            log.warning("%s epoch %d rank %d: %s", self.split.root, plan.epoch, self.rank, self.skipped.summary())
