"""``dataset.json``: the manifest of one split directory, and the up-front checks loaders run.

The manifest records the dataset name, the split, the classes, every shard with its sample count,
size and SHA-256, the writer version, and what the writer converted or skipped. Loaders call
:func:`verify_split` before building anything, so a missing index file, a truncated tar, a shard
whose count or hash does not match, or a sample without its ``json`` fails at once with the shard
(and key) named, instead of deep inside a decode thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from wsol_core.data.format import (
    FORMAT_NAME,
    MANIFEST_NAME,
    WRITER_VERSION,
    IndexedSample,
    ShardError,
    read_index,
    sha256_file,
)

VerifyMode = Literal["none", "fast", "full"]


@dataclass
class ShardInfo:
    """One tar of a split."""

    name: str
    index: str
    num_samples: int
    sha256: str
    bytes: int
    #: Hash of what went into the shard (keys and writer options); lets a resumed run know a
    #: finished shard is the one it would write again.
    fingerprint: str = ""


@dataclass
class Manifest:
    """The contents of a split's ``dataset.json``."""

    dataset: str
    split: str
    num_classes: int
    class_names: list[str]
    shards: list[ShardInfo]
    labeled: bool = True
    has_masks: bool = False
    writer_version: str = WRITER_VERSION
    format: str = FORMAT_NAME
    #: Images re-encoded by the writer, by reason (``png_as_jpeg``, ``cmyk``, ``grayscale``, ...),
    #: and ``kept`` for those stored byte for byte.
    conversions: dict[str, int] = field(default_factory=dict)
    #: Boxes the writer clipped to the image, and source images it skipped (with the reason).
    boxes_clipped: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: Writer options that shaped the bytes (shard size, shuffle seed, JPEG quality, ...).
    options: dict[str, object] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["num_samples"] = self.num_samples
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, doc: dict, where: str) -> Manifest:
        try:
            shards = [ShardInfo(**s) for s in doc["shards"]]
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {k: v for k, v in doc.items() if k in known and k != "shards"}
            manifest = cls(shards=shards, **kwargs)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: not a valid {MANIFEST_NAME} ({exc})") from None
        if doc.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ValueError(f"{where}: format {doc.get('format')!r} is not {FORMAT_NAME!r}")
        if "num_samples" in doc and doc["num_samples"] != manifest.num_samples:
            raise ValueError(
                f"{where}: num_samples {doc['num_samples']} differs from the sum of the shard counts "
                f"{manifest.num_samples}"
            )
        if len(manifest.class_names) not in (0, manifest.num_classes):
            raise ValueError(f"{where}: {len(manifest.class_names)} class names for {manifest.num_classes} classes")
        return manifest


def load_manifest(split_dir: str | Path) -> Manifest:
    """Read ``split_dir/dataset.json``; a clear error when it is missing or malformed."""
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {split_dir} is not a shard directory written by jobs/make_shards.py"
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return Manifest.from_dict(doc, str(path))


def save_manifest(split_dir: str | Path, manifest: Manifest) -> Path:
    """Write ``dataset.json`` atomically (a reader never sees half a manifest)."""
    path = Path(split_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path


@dataclass
class VerifiedShard:
    """A shard that passed the checks, and its first global sample number.

    The parsed index is not kept (ImageNet has 1.28 M index lines; a reader that needs offsets
    re-reads one shard's index with :meth:`index`).
    """

    tar: Path
    idx: Path
    info: ShardInfo
    start: int

    @property
    def num_samples(self) -> int:
        return self.info.num_samples

    def index(self) -> list[IndexedSample]:
        return read_index(self.idx)


@dataclass
class VerifiedSplit:
    """A split directory whose manifest, shards and index files agree."""

    root: Path
    manifest: Manifest
    shards: list[VerifiedShard]
    #: Per-sample problems found in the index (a sample without ``json``, ...). Empty unless the
    #: caller tolerates them (``skip_corrupt``); the loaders then skip those samples, counted.
    problems: list[ShardError]

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def locate(self, global_index: int) -> tuple[VerifiedShard, int]:
        """The shard holding a global sample number and the position inside it."""
        lo, hi = 0, len(self.shards) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.shards[mid].start <= global_index:
                lo = mid
            else:
                hi = mid - 1
        shard = self.shards[lo]
        return shard, global_index - shard.start


def verify_split(
    split_dir: str | Path,
    *,
    mode: VerifyMode = "fast",
    tolerate_sample_problems: bool = False,
) -> VerifiedSplit:
    """Check a split directory before loading it.

    ``fast`` (the default) reads only the manifest and the index files: every shard and index
    present, tar sizes and sample counts equal to the manifest's, every indexed member inside the
    tar (a truncated tar fails here), keys unique, and every sample with an image and a ``json``
    member (and ``cls`` in labeled splits). ``full`` adds the SHA-256 of every tar. ``none`` only
    parses the manifest and the index files.

    Structural problems always raise. Per-sample problems (a missing member) raise
    :class:`ShardError` naming the shard and key unless ``tolerate_sample_problems``, in which case
    they are returned in :attr:`VerifiedSplit.problems`.
    """
    root = Path(split_dir)
    manifest = load_manifest(root)
    if not manifest.shards:
        raise ValueError(f"{root / MANIFEST_NAME}: lists no shards")
    shards: list[VerifiedShard] = []
    problems: list[ShardError] = []
    seen_keys: dict[str, str] = {}
    start = 0
    for info in manifest.shards:
        tar = root / info.name
        idx = root / info.index
        if not tar.is_file():
            raise ShardError(tar, None, "shard listed in dataset.json is missing")
        if not idx.is_file():
            raise ShardError(
                tar,
                None,
                f"missing DALI index file {idx.name}; rebuild it with `python jobs/make_shards.py index {root}`",
            )
        size = tar.stat().st_size
        if mode != "none" and info.bytes and size != info.bytes:
            raise ShardError(
                tar, None, f"size {size} bytes differs from dataset.json ({info.bytes}); truncated or replaced?"
            )
        samples = read_index(idx)
        if len(samples) != info.num_samples:
            raise ShardError(tar, None, f"index lists {len(samples)} samples but dataset.json says {info.num_samples}")
        if mode != "none":
            for s in samples:
                if s.end > size:
                    raise ShardError(tar, s.key, f"truncated tar: the sample ends at byte {s.end}, the file has {size}")
                if s.key in seen_keys:
                    raise ShardError(tar, s.key, f"duplicate key (also in {seen_keys[s.key]})")
                seen_keys[s.key] = info.name
                missing = []
                if s.image_ext() is None:
                    missing.append("image (jpg/png)")
                if "json" not in s.components:
                    missing.append("json")
                if manifest.labeled and "cls" not in s.components:
                    missing.append("cls")
                if manifest.has_masks and "mask.png" not in s.components:
                    missing.append("mask.png")
                if missing:
                    err = ShardError(tar, s.key, f"missing {' and '.join(missing)} member")
                    if not tolerate_sample_problems:
                        raise err
                    problems.append(err)
        if mode == "full":
            check_hash(tar, info)
        shards.append(VerifiedShard(tar, idx, info, start))
        start += info.num_samples
    return VerifiedSplit(root, manifest, shards, problems)


def check_hash(tar: Path, info: ShardInfo) -> None:
    """The tar's SHA-256 is the one its manifest records, or :class:`ShardError`."""
    digest = sha256_file(tar)
    if digest != info.sha256:
        raise ShardError(tar, None, f"SHA-256 {digest[:16]}... differs from dataset.json ({info.sha256[:16]}...)")


def default_hash_cache() -> Path:
    """``$XDG_CACHE_HOME/wsol/verified_shards.json`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsol" / "verified_shards.json"


def check_shard_hashes(split: VerifiedSplit, cache: Path | None = None) -> tuple[int, int]:
    """Every tar's SHA-256 against the manifest, once per (path, size, mtime): a tar whose size and
    modification time are unchanged since it last matched is not read again. The cache is a JSON
    file of such matches (``default_hash_cache()``); a mismatch raises :class:`ShardError` and is
    never cached. Returns ``(hashed, from_cache)``."""
    cache = cache or default_hash_cache()
    try:
        known: dict = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    hashed = cached = 0
    for shard in split.shards:
        st = shard.tar.stat()
        key = str(shard.tar.resolve())
        stamp = [st.st_size, st.st_mtime_ns, shard.info.sha256]
        if known.get(key) == stamp:
            cached += 1
            continue
        check_hash(shard.tar, shard.info)  # a mismatch raises before anything is cached
        known[key] = stamp
        hashed += 1
    if hashed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            tmp.replace(cache)  # atomic: concurrent runs never read half a file
        except OSError:
            pass  # a read-only home: hashed again next run, still correct
    return hashed, cached
