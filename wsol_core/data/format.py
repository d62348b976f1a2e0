"""The shard format: names, keys, tar members, DALI index files and per-sample metadata.

Everything that both the writer and the two loaders must agree on lives here, so the format is
defined once:

* a split directory holds ``{split}-{000000}.tar`` shards, a DALI index file ``{split}-000000.idx``
  beside each, and one ``dataset.json`` manifest (see :mod:`wsol_core.data.manifest`);
* a sample is the tar members ``{key}.cls``, ``{key}.jpg`` (or ``.png``), ``{key}.json`` and, for
  PxAP, ``{key}.mask.png`` / ``{key}.ignore.png``, written in that fixed order;
* the index file is the text format of DALI's ``wds2idx`` (version ``v1.2``): a header line
  ``v1.2 <num_samples>`` then one line per sample, ``<ext> <data offset> <size> <member name>``
  repeated for each of its members;
* ``json`` is ``{"id", "label", "width", "height", "boxes": [[x0, y0, x1, y1], ...]}`` in original
  pixel coordinates with inclusive corners, as in the evaluation protocol's metadata files.

Shards are read as bytes only: no member is ever unpickled or handed to a generic decoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bumped whenever the bytes the writer produces for the same input change.
WRITER_VERSION = "1"
INDEX_VERSION = "v1.2"
MANIFEST_NAME = "dataset.json"
FORMAT_NAME = "wsol-webdataset"

IMAGE_EXTS = ("jpg", "png")
#: Tar member order inside a sample; fixed so that output bytes are deterministic.
MEMBER_ORDER = ("cls", "jpg", "png", "json", "mask.png", "ignore.png")
#: USTAR names are at most 100 bytes; the longest extension is ``.ignore.png``.
MAX_KEY_LEN = 88

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


class ShardError(ValueError):
    """Bad shard content, with the shard and the sample key it was found in."""

    def __init__(self, shard: str | Path, key: str | None, reason: str) -> None:
        self.shard = str(shard)
        self.key = key
        self.reason = reason
        where = f"shard {self.shard}" + (f", sample {key!r}" if key is not None else "")
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable: DataLoader workers send these to the main process
        return (ShardError, (self.shard, self.key, self.reason))


def shard_name(split: str, index: int) -> str:
    """``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def index_name_for(tar_name: str) -> str:
    """The DALI index file that sits beside a tar: ``train-000000.tar`` -> ``train-000000.idx``."""
    return tar_name[: -len(".tar")] + ".idx" if tar_name.endswith(".tar") else tar_name + ".idx"


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


def key_from_id(image_id: str) -> str:
    """A tar-safe sample key derived from an image id (a relative path or a bare name).

    The extension of the last path component is dropped, ``/`` becomes ``__`` and anything
    outside ``[A-Za-z0-9_-]`` becomes ``_``: keys must not contain dots (webdataset and DALI split
    the extension at the first dot of the member name) nor slashes. Long ids are truncated and
    suffixed with a hash so they stay unique and fit a USTAR header.
    """
    stem = image_id.replace("\\", "/").strip("/")
    head, _, last = stem.rpartition("/")
    if "." in last:
        last = last[: last.rindex(".")]
    stem = f"{head}/{last}" if head else last
    key = _KEY_BAD_CHARS.sub("_", stem.replace("/", "__")) or "_"
    if len(key) > MAX_KEY_LEN:
        key = key[: MAX_KEY_LEN - 9] + "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return key


def assign_keys(image_ids: Sequence[str]) -> list[str]:
    """Unique keys for a split's ids; ids whose sanitized keys collide get a hash suffix."""
    id_counts: dict[str, int] = {}
    for image_id in image_ids:
        id_counts[image_id] = id_counts.get(image_id, 0) + 1
    dups = sorted(i for i, n in id_counts.items() if n > 1)
    if dups:
        raise ValueError(f"duplicate image ids in one split: {dups[:5]}")
    keys = [key_from_id(i) for i in image_ids]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    out = []
    for image_id, key in zip(image_ids, keys):
        if counts[key] > 1:
            key = key[: MAX_KEY_LEN - 9] + "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
        out.append(key)
    if len(set(out)) != len(out):  # pragma: no cover - would need a SHA-1 prefix collision
        raise ValueError("could not derive unique sample keys")
    return out


# ---------------------------------------------------------------------------------------------
# Tar members and index files
# ---------------------------------------------------------------------------------------------


def tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A deterministic tar member: fixed mtime, owner and mode, so the same input gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


@dataclass(frozen=True)
class IndexedSample:
    """One line of a DALI index file: the sample key and ``ext -> (data offset, size)``."""

    key: str
    components: dict[str, tuple[int, int]]

    @property
    def end(self) -> int:
        return max(off + size for off, size in self.components.values())

    @property
    def header_offset(self) -> int:
        """Offset of the first member's tar header (every member has one 512-byte header)."""
        return min(off for off, _ in self.components.values()) - 512

    def image_ext(self) -> str | None:
        for ext in IMAGE_EXTS:
            if ext in self.components:
                return ext
        return "jpeg" if "jpeg" in self.components else None


def split_member_name(name: str) -> tuple[str, str]:
    """``key.ext`` split at the first dot of the last path component, as DALI and webdataset do."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def build_index(tar_path: str | Path) -> list[tuple[str, list[tuple[str, int, int, str]]]]:
    """Index entries of a tar: ``[(key, [(ext, data_offset, size, member_name), ...]), ...]``.

    Reads the headers with :mod:`tarfile` (``offset_data`` is exact for any header format); the
    grouping rule is the one of ``wds2idx``: consecutive members with the same key form a sample,
    hidden members and non-regular entries are left out.
    """
    out: list[tuple[str, list[tuple[str, int, int, str]]]] = []
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                continue
            if out and out[-1][0] == key:
                out[-1][1].append((ext, member.offset_data, member.size, member.name))
            else:
                out.append((key, [(ext, member.offset_data, member.size, member.name)]))
    return out


def index_text(entries: Iterable[tuple[str, list[tuple[str, int, int, str]]]]) -> str:
    """The ``wds2idx`` v1.2 text for index entries."""
    entries = list(entries)
    if not entries:
        raise ValueError("cannot index an empty tar")
    lines = [f"{INDEX_VERSION} {len(entries)}"]
    for _, comps in entries:
        lines.append(" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in comps))
    return "\n".join(lines) + "\n"


def write_index(tar_path: str | Path, idx_path: str | Path) -> None:
    """Write the DALI index file of a tar (what ``wds2idx`` would write)."""
    Path(idx_path).write_text(index_text(build_index(tar_path)))


def read_index(idx_path: str | Path) -> list[IndexedSample]:
    """Parse a DALI index file (``v1.2`` with member names, or ``v1.1`` without them)."""
    path = Path(idx_path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ShardError(path, None, "empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] not in ("v1.1", "v1.2") or not header[1].isdigit():
        raise ShardError(path, None, f"not a DALI webdataset index (header {lines[0]!r})")
    with_names = header[0] == "v1.2"
    step = 4 if with_names else 3
    samples = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts or len(parts) % step:
            raise ShardError(path, None, f"malformed index line {lineno}: {line!r}")
        comps: dict[str, tuple[int, int]] = {}
        key = None
        for i in range(0, len(parts), step):
            ext, off, size = parts[i], int(parts[i + 1]), int(parts[i + 2])
            if with_names:
                key = split_member_name(parts[i + 3])[0]
            comps[ext] = (off, size)
        samples.append(IndexedSample(key or f"#{lineno - 2}", comps))
    if len(samples) != int(header[1]):
        raise ShardError(path, None, f"index header says {header[1]} samples but lists {len(samples)}")
    return samples


def read_member_bytes(tar_path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one tar member, by the data offset and size from its index line."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ShardError(tar_path, None, f"truncated tar: member at offset {offset} is cut short")
    return data


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Encoded image checks
# ---------------------------------------------------------------------------------------------


def encoded_image_problem(data: bytes | memoryview | np.ndarray, ext: str, *, entropy: bool = False) -> str | None:
    """A cheap structural check of encoded image bytes; the reason they are bad, or None.

    Catches what a decoder may not: a JPEG cut short inside its last scan can be decoded
    "successfully" into a partly grey picture by some decoders. In entropy-coded JPEG data a 0xFF
    byte is always followed by 0x00 or a restart marker, so the end-of-image marker can only be the
    real one: a complete JPEG has an EOI after its last start-of-scan. (An EXIF thumbnail's own
    SOS/EOI come before the main image's, so they do not fool the check.)

    With ``entropy``, a JPEG's entropy-coded data is decoded too (:func:`jpeg_entropy_problem`):
    bytes flipped inside a scan leave every marker in place, and PIL, OpenCV, torchvision and
    DALI's CPU decoder all decode such a file "successfully" into a smeared picture, printing
    libjpeg's warning on stderr at most.
    """
    buf = bytes(data) if not isinstance(data, bytes) else data
    if len(buf) == 0:
        return "empty image member"
    if ext in ("jpg", "jpeg"):
        if buf[:2] != b"\xff\xd8":
            if buf[:8] == b"\x89PNG\r\n\x1a\n":
                return "PNG data in a jpg member"
            return "not a JPEG (no SOI marker)"
        sos = buf.rfind(b"\xff\xda")
        eoi = buf.rfind(b"\xff\xd9")
        if sos < 0:
            return "truncated or corrupt JPEG (no scan)"
        if eoi < sos:
            return "truncated JPEG (no end-of-image marker after the last scan)"
        return jpeg_entropy_problem(buf) if entropy else None
    if ext == "png":
        if buf[:8] != b"\x89PNG\r\n\x1a\n":
            return "not a PNG (bad signature)"
        if buf.rfind(b"IEND") < 0 or len(buf) - buf.rfind(b"IEND") != 8:
            return "truncated PNG (no IEND chunk at the end)"
        return None
    return f"unsupported image extension {ext!r}"


#: JPEG colour spaces that libjpeg-turbo's RGB output does not convert the way PIL does (PIL
#: inverts Adobe CMYK itself): checked strictly, but their pixels still come from PIL.
_PIL_COLOUR_SPACES = ("CMYK", "YCCK")


def decode_jpeg_strict(data: bytes) -> np.ndarray | None:
    """Decode a JPEG to ``H x W x 3`` RGB with libjpeg-turbo in strict mode (simplejpeg), which
    raises ``ValueError`` on what plain libjpeg only warns about ("Corrupt JPEG data: ...",
    "Premature end of data segment"). The pixels equal PIL's (``Image.open(...).convert("RGB")``:
    the same accurate integer IDCT and fancy upsampling; checked by the tests). ``None`` where PIL
    must decode: a CMYK / YCCK JPEG (checked the same way, converted by PIL), or a header
    TurboJPEG does not take (sampling factors it cannot name, as in PIL's own CMYK files, or a
    garbage Huffman table): PIL's decode, which raises on the latter, is then the check."""
    import simplejpeg

    try:
        colour = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return None
    if colour in _PIL_COLOUR_SPACES:
        simplejpeg.decode_jpeg(data, colorspace="CMYK", strict=True)
        return None
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)


def jpeg_entropy_problem(data: bytes) -> str | None:
    """Why a JPEG's entropy-coded data is bad (a strict decode fails), or None. Costs about one
    decode (BENCHMARKS.md, "Corrupt JPEG data")."""
    try:
        decode_jpeg_strict(data)
    except Exception as exc:  # simplejpeg raises ValueError with libjpeg's message
        return strict_decode_failure(exc)
    return None


def strict_decode_failure(exc: BaseException) -> str:
    """The bad-sample reason for a failed :func:`decode_jpeg_strict`."""
    return f"JPEG data fails a strict decode ({str(exc).strip() or type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Per-sample metadata
# ---------------------------------------------------------------------------------------------


def meta_json(image_id: str, label: int, width: int, height: int, boxes: Sequence[Sequence[float]]) -> bytes:
    """The ``json`` member's bytes (sorted keys, compact: deterministic)."""
    doc = {
        "id": image_id,
        "label": int(label),
        "width": int(width),
        "height": int(height),
        "boxes": [[_num(v) for v in box] for box in boxes],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _num(v: float) -> int | float:
    f = float(v)
    return int(f) if f.is_integer() else f


@dataclass(frozen=True)
class SampleMeta:
    """What the loaders read from a sample's ``json`` and ``cls`` members."""

    key: str
    image_id: str
    label: int
    width: int
    height: int
    boxes: np.ndarray  # [k, 4] float32


def box_problem(box: Sequence[float], width: int, height: int) -> str | None:
    """Why a box is invalid for an image of this size, or None.

    Inclusive corners: valid coordinates are ``0 <= x0 <= x1 <= width`` (the far corner may equal
    the width because some published metadata is 1-based; anything further is outside the image).
    """
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return f"malformed box {box!r}"
    x0, y0, x1, y1 = box
    if x0 > x1 or y0 > y1:
        return f"inverted box {list(box)}"
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return f"box {list(box)} outside the {width}x{height} image"
    return None


def parse_meta(
    json_bytes: bytes | None,
    cls_bytes: bytes | None,
    *,
    shard: str,
    key: str,
    labeled: bool,
    num_classes: int,
) -> SampleMeta:
    """Parse and check a sample's ``json`` and ``cls`` members; :class:`ShardError` when bad.

    Checks: both members present (``cls`` may be absent in unlabeled splits), valid JSON with the
    required fields, positive size, every box inside the image and not inverted, the class index
    in range and equal to the json's ``label``.
    """
    if not json_bytes:
        raise ShardError(shard, key, "missing json member")
    try:
        doc = json.loads(json_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(shard, key, f"json member is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ShardError(shard, key, "json member is not an object")
    missing = [f for f in ("width", "height", "boxes") if f not in doc]
    if missing:
        raise ShardError(shard, key, f"json member lacks {missing}")
    width, height = doc["width"], doc["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ShardError(shard, key, f"bad image size {width}x{height} in json")
    boxes = doc["boxes"]
    if not isinstance(boxes, list):
        raise ShardError(shard, key, "json boxes is not a list")
    for box in boxes:
        problem = box_problem(box, width, height) if isinstance(box, list) else f"malformed box {box!r}"
        if problem:
            raise ShardError(shard, key, problem)
    if cls_bytes:
        try:
            label = int(bytes(cls_bytes).decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise ShardError(shard, key, f"cls member is not an integer: {bytes(cls_bytes)[:20]!r}") from None
    elif labeled:
        raise ShardError(shard, key, "missing cls member in a labeled split")
    else:
        label = -1
    if label != -1 and not 0 <= label < num_classes:
        raise ShardError(shard, key, f"class index {label} outside [0, {num_classes})")
    if labeled and label == -1:
        raise ShardError(shard, key, "unlabeled sample (cls -1) in a labeled split")
    if "label" in doc and doc["label"] != label:
        raise ShardError(shard, key, f"cls says {label} but json label says {doc['label']}")
    arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return SampleMeta(key, str(doc.get("id", key)), label, width, height, arr)


# ---------------------------------------------------------------------------------------------
# PxAP masks
# ---------------------------------------------------------------------------------------------


def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize to ``size x size`` with OpenCV's ``INTER_NEAREST`` sampling.

    The protocol resizes masks with ``cv2.resize(..., INTER_NEAREST)``. OpenCV computes the scale
    as ``inverse = dst / src`` and samples source pixel ``floor(x * (1 / inverse))``; written as
    ``floor(x * src / dst)`` the rounding differs for some sizes (12 pixels over 40 OpenImages
    masks), so the same two floating-point steps are taken here, then clamped to the last pixel.
    Reproduced so that the loaders need no OpenCV and give the protocol's exact masks.
    """
    h, w = mask.shape
    positions = np.arange(size, dtype=np.float64)
    ys = np.minimum(np.floor(positions * (1.0 / (size / h))).astype(np.int64), h - 1)
    xs = np.minimum(np.floor(positions * (1.0 / (size / w))).astype(np.int64), w - 1)
    return mask[ys[:, None], xs[None, :]]


def decode_mask_png(data: bytes, *, shard: str, key: str, what: str) -> np.ndarray:
    """A stored mask as a boolean array (any non-zero grey value is foreground, as the protocol's ``> 0.5``)."""
    from PIL import Image

    problem = encoded_image_problem(data, "png")
    if problem:
        raise ShardError(shard, key, f"{what}: {problem}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert("L"))
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ShardError(shard, key, f"{what}: cannot decode ({exc})") from None
    return arr > 0


def protocol_mask(
    mask_png: bytes | None,
    ignore_png: bytes | None,
    *,
    size: int,
    shard: str,
    key: str,
) -> np.ndarray:
    """The protocol's evaluation mask: ``[size, size]`` uint8, 1 foreground, 255 ignore, 0 background.

    As in the reference ``get_mask``: masks resized with nearest sampling, ignore = ignore-box
    region minus the foreground.
    """
    if not mask_png:
        raise ShardError(shard, key, "missing mask.png member in a split with masks")
    fg = resize_nearest(decode_mask_png(mask_png, shard=shard, key=key, what="mask.png"), size)
    out = fg.astype(np.uint8)
    if ignore_png:
        ign = resize_nearest(decode_mask_png(ignore_png, shard=shard, key=key, what="ignore.png"), size)
        out[np.logical_and(ign, ~fg)] = 255
    return out


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A boolean mask as a deterministic 1-bit PNG (reads back as grey 0 / 255)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=bool)).save(buf, format="PNG")
    return buf.getvalue()
