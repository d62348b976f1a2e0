"""The DALI input pipeline: ``fn.readers.webdataset`` over the shards, DALI decode and augment.

Two DALI pipelines per epoch, joined on the host:

1. a *reader* pipeline (CPU): ``fn.readers.webdataset`` with the index files, sharded by rank
   (``shard_id`` = the rank's slice of :class:`~wsol_core.data.contract.EpochPlan`,
   ``num_shards`` = world size, ``stick_to_shard``, ``pad_last_batch``), shuffled with a seeded
   buffer in training. It outputs the encoded image, ``json``, ``cls`` (and masks) members as
   bytes, and each member's ``source_info`` (tar path, offset, member name: the key).
2. the host parses the small ``json``/``cls`` members (boxes, label, size), checks every sample
   (structure of the encoded image, boxes inside the image, members present) and keeps the batch's
   metadata in a queue;
3. a *decode* pipeline takes the encoded images through ``fn.external_source`` (the reader's
   output buffer is passed as it is in the common case, no per-sample copies) and decodes on the
   ``mixed`` device on a GPU (nvJPEG) or with ``device="cpu"`` (``device_id=None``) where there
   is none; then resize / crop / flip / normalize as the protocol says.

Why two pipelines rather than one: when DALI fails to decode, it fails the whole batch and does
not say which sample. With the host in between, the loader knows exactly which samples were in
flight, finds the bad one (by decoding them on the host), names its shard and key, and with
``skip_corrupt`` replaces it and rebuilds only the decode pipeline. Pipelines are rebuilt each
epoch with seeds derived from ``(seed, epoch, slice)``, which makes every epoch's order and
augmentation reproducible on resume; building them takes milliseconds.
"""

from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    SampleMeta,
    ShardError,
    encoded_image_problem,
    parse_meta,
    protocol_mask,
    read_member_bytes,
    split_member_name,
)
from wsol_core.data.manifest import VerifiedSplit

log = logging.getLogger(__name__)

_IMAGE_EXT_SET = "jpg;png;jpeg"


def host_decode_problem(data: bytes) -> str | None:
    """Decode an image with PIL on the host; the reason it fails, or None (diagnosis only)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class _Source:
    """Where a sample's image bytes live: enough to read them again for diagnosis or replay."""

    tar: str
    offset: int
    size: int
    key: str


@dataclass
class _FedBatch:
    """A batch handed to the decode pipeline, waiting for its decoded images."""

    data: object  # TensorListCPU from the reader, or a list of uint8 arrays
    metas: list[SampleMeta]
    padding: list[bool]
    masks: list[np.ndarray] | None
    sources: list[_Source]

    def replace(self, j: int, donor: int) -> None:
        """Make sample ``j`` a flagged repeat of sample ``donor`` of the same batch."""
        self.metas[j] = self.metas[donor]
        self.sources[j] = self.sources[donor]
        if self.masks is not None:
            self.masks[j] = self.masks[donor]
        self.padding[j] = True

    def reread(self) -> list[np.ndarray]:
        """The batch's image bytes read again from the tars (after a decode pipeline rebuild)."""
        return [np.frombuffer(read_member_bytes(s.tar, s.offset, s.size), dtype=np.uint8) for s in self.sources]


def _parse_source_info(raw: np.ndarray) -> tuple[str, int, str, str] | None:
    """``/path/shard.tar:offset:key.ext`` -> (tar, offset, key, ext); None for an absent member."""
    text = bytes(raw).decode("utf-8", "replace")
    if not text:
        return None
    tar, offset, name = text.rsplit(":", 2)
    key, ext = split_member_name(name)
    return tar, int(offset), key, ext


class _HostFeeder:
    """The decode pipeline's ``external_source``: pulls reader batches, checks them on the host."""

    def __init__(self, loader: DaliLoader, plan: EpochPlan, reader) -> None:
        self.loader = loader
        self.plan = plan
        self.reader = reader
        self.pending: deque[_FedBatch] = deque()
        self.replay: deque[_FedBatch] = deque()
        self.error: BaseException | None = None
        self.batch_index = 0
        self.last_good: tuple[np.ndarray, SampleMeta, np.ndarray | None, _Source] | None = None

    def __call__(self):
        try:
            fb = self.replay.popleft() if self.replay else self._next_from_reader()
        except BaseException as exc:  # surfaced by DaliLoader, DALI itself only re-raises it
            self.error = exc
            raise
        self.pending.append(fb)
        return fb.data if not isinstance(fb.data, tuple) else list(fb.data)

    def _next_from_reader(self) -> _FedBatch:
        loader, plan = self.loader, self.plan
        try:
            outs = self.reader.run()
        except Exception as exc:
            shards = ", ".join(s.tar.name for s in loader.split.shards)
            raise ShardError(
                loader.split.root, None, f"DALI's webdataset reader failed on one of [{shards}]: {exc}"
            ) from exc
        img_tl, json_tl, cls_tl = outs[0], outs[1], outs[2]
        mask_tl = ignore_tl = None
        if loader.load_masks:
            mask_tl, ignore_tl = outs[3], outs[4]
        info_tls = outs[-3:]
        n = len(img_tl)
        metas: list[SampleMeta | None] = [None] * n
        masks: list[np.ndarray | None] | None = [None] * n if loader.load_masks else None
        padding = [False] * n
        sources: list[_Source] = []
        bad: set[int] = set()
        manifest = loader.split.manifest
        # DALI's prefetching calls this source a batch or two past the epoch's last one; those
        # batches are never yielded, so nothing in them counts (a bad sample there would be
        # counted twice: again when the next epoch reads it).
        read_ahead = self.batch_index >= plan.num_batches
        for j in range(n):
            pos = self.batch_index * plan.batch_size + j
            padding[j] = read_ahead or (plan.kind == "eval" and pos >= plan.slice_size)
            # The image member's source info names the tar, the offset and the key; a sample
            # without an image is named by its json or cls member instead.
            img_info = _parse_source_info(np.asarray(info_tls[0][j]))
            info = img_info
            for tl in info_tls[1:]:
                if info is not None:
                    break
                info = _parse_source_info(np.asarray(tl[j]))
            if info is None:
                raise ShardError(loader.split.root, None, "the reader returned a sample with no members")
            tar, _, key, _ = info
            img = np.asarray(img_tl[j])
            sources.append(_Source(tar, img_info[1] if img_info else 0, img.size, key))
            try:
                if img_info is None or img.size == 0:
                    raise ShardError(tar, key, "missing image (jpg/png) member")
                problem = encoded_image_problem(
                    img.tobytes(), img_info[3], entropy=loader.options.jpeg_check == "strict"
                )
                if problem:
                    raise ShardError(tar, key, problem)
                metas[j] = parse_meta(
                    np.asarray(json_tl[j]).tobytes(),
                    np.asarray(cls_tl[j]).tobytes(),
                    shard=tar,
                    key=key,
                    labeled=manifest.labeled,
                    num_classes=manifest.num_classes,
                )
                if masks is not None and mask_tl is not None and ignore_tl is not None:
                    masks[j] = protocol_mask(
                        np.asarray(mask_tl[j]).tobytes(),
                        np.asarray(ignore_tl[j]).tobytes(),
                        size=loader.options.mask_size,
                        shard=tar,
                        key=key,
                    )
            except ShardError as err:
                if not loader.options.skip_corrupt:
                    raise
                if not padding[j]:
                    loader.skipped.add(err)
                bad.add(j)
        self.batch_index += 1
        good = [j for j in range(n) if j not in bad]
        if good:
            g = good[-1]
            meta = metas[g]
            assert meta is not None  # every good sample's meta was parsed above
            self.last_good = (np.array(img_tl[g]), meta, None if masks is None else masks[g], sources[g])
        if not bad:
            return _FedBatch(img_tl, metas, padding, masks, sources)  # type: ignore[arg-type]
        # Replace bad samples by flagged repeats of a good one: shapes and batch counts stay equal.
        if self.last_good is None:
            first = sources[min(bad)]
            raise ShardError(first.tar, first.key, "every sample so far is bad; nothing to pad with")
        donor_img, donor_meta, donor_mask, donor_src = self.last_good
        data = []
        for j in range(n):
            if j in bad:
                data.append(donor_img)
                metas[j], sources[j], padding[j] = donor_meta, donor_src, True
                if masks is not None:
                    masks[j] = donor_mask
            else:
                data.append(np.array(img_tl[j]))
        return _FedBatch(data, metas, padding, masks, sources)  # type: ignore[arg-type]


def _shutdown(pipe) -> None:
    """Stop a DALI pipeline's threads (``Pipeline._shutdown`` is what its ``__del__`` calls)."""
    try:
        pipe._shutdown()
    except Exception:  # already shut down, or a DALI version without the method
        pass


class DaliLoader:
    """The DALI loader (see the module docstring and :mod:`wsol_core.data.loader`)."""

    backend = "dali"

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
        self._epoch = 0
        self._gpu = device.type == "cuda"
        self.decode_rebuilds = 0

    # -- the loader interface ----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def plan(self) -> EpochPlan:
        return EpochPlan(
            self.split.num_samples, self.options.batch_size, self.rank, self.world_size, self._epoch, self.kind
        )

    def __len__(self) -> int:
        return self.plan().num_batches

    def close(self) -> None:
        """Nothing is held between epochs (pipelines live inside one iteration)."""

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan()
        plan.check(str(self.split.root))
        reader = self._reader_pipeline(plan)
        feeder = _HostFeeder(self, plan, reader)
        decoder = self._decode_pipeline(plan, feeder, 0)
        skipped_before = self.skipped.total
        try:
            for _ in range(plan.num_batches):
                while True:
                    try:
                        outs = decoder.run()
                        break
                    except Exception as exc:
                        if feeder.error is not None:
                            err, feeder.error = feeder.error, None
                            raise err from None
                        decoder = self._recover(plan, feeder, decoder, exc)
                yield self._to_batch(outs, feeder.pending.popleft(), plan)
        finally:
            # Shut the pipelines down now rather than when the garbage collector gets to them:
            # a pipeline collected later in a forked child (a DataLoader worker) would wait
            # forever for threads that do not exist there.
            _shutdown(decoder)
            _shutdown(reader)
        if self.skipped.total > skipped_before:
            log.warning("%s epoch %d rank %d: %s", self.split.root, plan.epoch, self.rank, self.skipped.summary())

    # -- pipelines -------------------------------------------------------------------------------

    def _reader_pipeline(self, plan: EpochPlan):
        from nvidia.dali import fn
        from nvidia.dali.pipeline import Pipeline

        opts = self.options
        exts = [_IMAGE_EXT_SET, "json", "cls"] + (["mask.png", "ignore.png"] if self.load_masks else [])
        pipe = Pipeline(
            batch_size=plan.batch_size,
            num_threads=1,
            device_id=None,
            prefetch_queue_depth=opts.prefetch,
            seed=plan.seed(opts.seed, 1),
        )
        with pipe:
            outs: list[Any] = fn.readers.webdataset(  # type: ignore[assignment]  # one DataNode per ext
                paths=[str(s.tar) for s in self.split.shards],
                index_paths=[str(s.idx) for s in self.split.shards],
                ext=exts,
                missing_component_behavior="empty",  # checked on the host, with the key named
                shard_id=plan.slice_id,
                num_shards=plan.world_size,
                stick_to_shard=True,
                pad_last_batch=True,
                random_shuffle=plan.kind == "train",
                initial_fill=max(1, min(opts.shuffle_buffer, plan.slice_size)),
                seed=plan.seed(opts.seed, 2),
                name="reader",
            )
            infos = [fn.get_property(o, key="source_info") for o in outs[:3]]
            pipe.set_outputs(*outs, *infos)
        pipe.build()
        return pipe

    def _decode_pipeline(self, plan: EpochPlan, feeder: _HostFeeder, rebuild: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        opts = self.options
        train = plan.kind == "train"
        c, r = opts.crop_size, opts.resize_size
        gpu_args: dict[str, Any] = {}
        if self._gpu:
            # Preallocated decoder buffers (NVIDIA's ImageNet examples) avoid reallocations.
            gpu_args = dict(device_memory_padding=211025920, host_memory_padding=140544512)
        pipe = Pipeline(
            batch_size=plan.batch_size,
            num_threads=max(1, opts.num_threads),
            device_id=(self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self._gpu
            else None,
            prefetch_queue_depth=opts.prefetch,
            seed=plan.seed(opts.seed, 100 + rebuild),
        )
        dev = "mixed" if self._gpu else "cpu"
        with pipe:
            enc = fn.external_source(source=feeder, batch=True, dtype=types.UINT8, ndim=1, name="encoded")
            shape = fn.peek_image_shape(enc, adjust_orientation=False)
            crop: dict[str, Any] = {}
            # What each sample's window was drawn from travels out beside the image, so the
            # host can report it (``Batch.views``): a box of the source follows its crop.
            drawn: list[Any] = []
            if train and opts.random_resized_crop:
                # torchvision's draw (area, log-ratio, 10 attempts, then a centre crop), as
                # image_random_crop draws it, but with the window given back: (y, x), (h, w).
                anchor, window = fn.random_crop_generator(
                    shape,
                    random_area=list(opts.rrc_scale),
                    random_aspect_ratio=list(opts.rrc_ratio),
                    num_attempts=10,
                )
                img = fn.decoders.image_slice(
                    enc,
                    anchor,
                    window,
                    axis_names="HW",
                    device=dev,
                    output_type=types.RGB,
                    adjust_orientation=False,
                    **gpu_args,
                )
                img = fn.resize(img, resize_x=c, resize_y=c)
                drawn = [anchor, window]
            else:
                img = fn.decoders.image(enc, device=dev, output_type=types.RGB, adjust_orientation=False, **gpu_args)
                side = r if train else c
                # The protocol resizes to a square, ignoring the aspect ratio.
                img = fn.resize(img, resize_x=side, resize_y=side)
                if train:
                    pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
                    crop = dict(crop=(c, c), crop_pos_x=pos_x, crop_pos_y=pos_y)
                    drawn = [pos_x, pos_y]
            mirror = fn.random.coin_flip(probability=0.5) if train and opts.hflip else None
            out = fn.crop_mirror_normalize(
                img,
                dtype=types.FLOAT,
                output_layout="HWC" if opts.channels_last else "CHW",
                mean=[255.0 * m for m in opts.mean],
                std=[255.0 * s for s in opts.std],
                mirror=0 if mirror is None else mirror,
                **crop,
            )
            pipe.set_outputs(out, shape, *drawn, *([] if mirror is None else [mirror]))
        pipe.build()
        return pipe

    # -- failures ----------------------------------------------------------------------------------

    def _recover(self, plan: EpochPlan, feeder: _HostFeeder, decoder, exc: Exception):
        """DALI failed a decode: find the bad sample(s) among those in flight, then raise or skip."""
        pending = list(feeder.pending) + list(feeder.replay)
        culprits: list[tuple[_FedBatch, int, ShardError]] = []
        for fb in pending:
            for j, src in enumerate(fb.sources):
                problem = host_decode_problem(read_member_bytes(src.tar, src.offset, src.size))
                if problem:
                    culprits.append((fb, j, ShardError(src.tar, src.key, f"cannot decode image ({problem})")))
        if not culprits:
            keys = [s.key for fb in pending for s in fb.sources]
            raise RuntimeError(f"DALI failed on a batch that decodes on the host (keys {keys[:16]}...): {exc}") from exc
        if not self.options.skip_corrupt:
            raise culprits[0][2] from None
        counted = sum(1 for fb, j, _ in culprits if not fb.padding[j])
        for fb, j, err in culprits:
            if not fb.padding[j]:
                self.skipped.add(err)
            bad = {jj for f, jj, _ in culprits if f is fb}
            donors = [d for d in range(len(fb.sources)) if d not in bad]
            if not donors:
                raise ShardError(err.shard, err.key, "every sample of a batch failed to decode; nothing to pad with")
            fb.replace(j, donors[0])
        for fb in pending:
            fb.data = tuple(fb.reread())
        _shutdown(decoder)
        feeder.pending.clear()
        feeder.replay = deque(pending)
        self.decode_rebuilds += 1
        log.warning(
            "rebuilding the DALI decode pipeline after %d undecodable samples (%d counted as skipped; the others are "
            "repeats or batches read ahead past the epoch)",
            len(culprits),
            counted,
        )
        return self._decode_pipeline(plan, feeder, self.decode_rebuilds)

    # -- outputs -----------------------------------------------------------------------------------

    def _to_batch(self, outs, fb: _FedBatch, plan: EpochPlan) -> Batch:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        opts = self.options
        dense = outs[0].as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self._gpu else None
        feed_ndarray(dense, images, cuda_stream=stream)
        if opts.channels_last:
            images = images.permute(0, 3, 1, 2)  # NCHW shape over NHWC memory: channels_last
        shapes = np.asarray(outs[1].as_tensor())  # [B, 3] = (H, W, C) of the encoded images
        for j, meta in enumerate(fb.metas):
            if (int(shapes[j][1]), int(shapes[j][0])) != (meta.width, meta.height):
                err = ShardError(
                    fb.sources[j].tar,
                    meta.key,
                    f"image is {int(shapes[j][1])}x{int(shapes[j][0])} but its json says {meta.width}x{meta.height}",
                )
                if not opts.skip_corrupt:
                    raise err
                if not fb.padding[j]:
                    self.skipped.add(err)
                fb.padding[j] = True
        views = self._views(outs, fb, plan)
        return make_batch(images, fb.metas, fb.padding, fb.masks, views=views, pseudo_boxes=self.pseudo_boxes)

    def _views(self, outs, fb: _FedBatch, plan: EpochPlan) -> list[list[float]]:
        """``Batch.views`` from the windows the decode pipeline drew (see its outputs)."""
        opts = self.options
        train = plan.kind == "train"
        extra = [np.asarray(o.as_tensor()).reshape(len(fb.metas), -1) for o in outs[2:]]
        mirrored = extra.pop()[:, 0] if train and opts.hflip else np.zeros(len(fb.metas))
        c, r = opts.crop_size, opts.resize_size
        views = []
        for j, meta in enumerate(fb.metas):
            width, height = float(meta.width), float(meta.height)
            if train and opts.random_resized_crop:
                (y0, x0), (h, w) = extra[0][j], extra[1][j]
                window = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
            elif train:  # resize to r x r, then the c x c crop at crop_pos * (r - c)
                left, top = round(float(extra[0][j, 0]) * (r - c)), round(float(extra[1][j, 0]) * (r - c))
                sx, sy = width / r, height / r
                window = [left * sx, top * sy, (left + c) * sx, (top + c) * sy]
            else:
                window = [0.0, 0.0, width, height]
            views.append([*window, float(mirrored[j])])
        return views
