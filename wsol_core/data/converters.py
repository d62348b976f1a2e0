"""Converters from the field's source layouts to shards (all end in :func:`~wsol_core.data.writer.write_split`).

* :func:`convert_wsolmeta`: the evaluation protocol's metadata layout (Choe et al., CVPR 2020,
  "wsolevaluation"): one folder per split with ``image_ids.txt``, ``class_labels.txt``
  (``path,label``), ``image_sizes.txt`` (``path,w,h``) and ``localization.txt``: boxes
  ``path,x0,y0,x1,y1`` (several lines per image allowed) or, for PxAP, masks
  ``path,mask_path,ignore_path`` (several mask lines per image; the ignore path on the first).
  Covers CUB (train / val = CUBV2 / test), ImageNet-1K and OpenImages as the protocol publishes them.
* :func:`convert_cub`: the raw CUB-200-2011 release (``images.txt``, 1-based
  ``image_class_labels.txt``, ``bounding_boxes.txt`` as ``x y w h`` floats,
  ``train_test_split.txt``, ``classes.txt``); boxes become ``x, y, x + w, y + h``, which is how the
  protocol's CUB metadata has them.
* :func:`convert_imagenet`: raw ILSVRC2012 folders (``train/nXXXXXXXX/*.JPEG``; ``val`` flat or in
  class folders) and PASCAL-VOC XML box files; synset ids map to class indices in sorted order.
  Box coordinates are kept as the XML files give them.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from wsol_core.data.writer import FileMaterializer, SourceRecord, WriteResult, WriterOptions, write_split

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _materializer(options: WriterOptions) -> FileMaterializer:
    return FileMaterializer(jpeg_quality=options.jpeg_quality, verify_decode=options.verify_decode)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The protocol's metadata layout
# ---------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[list[str]]:
    """Non-empty lines split at commas (ids never contain commas in the protocol's files)."""
    return [line.split(",") for line in path.read_text().splitlines() if line.strip()]


def read_wsolmeta_split(
    metadata_split: str | Path,
    images_root: str | Path,
    *,
    masks_root: str | Path | None = None,
) -> tuple[list[SourceRecord], bool]:
    """Records of one metadata split folder, and whether it carries PxAP masks."""
    meta = Path(metadata_split)
    images_root = Path(images_root)
    masks_root = Path(masks_root) if masks_root is not None else images_root
    ids_file = meta / "image_ids.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"{ids_file} not found: not a wsolevaluation metadata split folder")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    id_set = set(ids)

    def known(image_id: str, where: Path) -> str:
        if image_id not in id_set:
            raise ValueError(f"{where}: {image_id!r} is not in image_ids.txt")
        return image_id

    labels: dict[str, int] = {}
    labels_file = meta / "class_labels.txt"
    if labels_file.is_file():
        for fields_ in _read_lines(labels_file):
            if len(fields_) != 2:
                raise ValueError(f"{labels_file}: expected 'path,label', got {','.join(fields_)!r}")
            labels[known(fields_[0], labels_file)] = int(fields_[1])
    sizes: dict[str, tuple[int, int]] = {}
    sizes_file = meta / "image_sizes.txt"
    if sizes_file.is_file():
        for fields_ in _read_lines(sizes_file):
            if len(fields_) != 3:
                raise ValueError(f"{sizes_file}: expected 'path,w,h', got {','.join(fields_)!r}")
            sizes[known(fields_[0], sizes_file)] = (int(fields_[1]), int(fields_[2]))
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    mask_paths: dict[str, list[str]] = {}
    ignore_paths: dict[str, str] = {}
    loc_file = meta / "localization.txt"
    has_masks = False
    if loc_file.is_file():
        for lineno, fields_ in enumerate(_read_lines(loc_file), start=1):
            image_id = known(fields_[0], loc_file)
            if len(fields_) == 5:
                x0, y0, x1, y1 = (float(v) for v in fields_[1:])
                boxes.setdefault(image_id, []).append((x0, y0, x1, y1))
            elif len(fields_) == 3:
                has_masks = True
                mask_paths.setdefault(image_id, []).append(str(masks_root / fields_[1]))
                if fields_[2]:
                    if image_id in ignore_paths:
                        raise ValueError(f"{loc_file}:{lineno}: a second ignore mask for {image_id}")
                    ignore_paths[image_id] = str(masks_root / fields_[2])
            else:
                raise ValueError(f"{loc_file}:{lineno}: expected 5 (box) or 3 (mask) fields, got {len(fields_)}")
        if boxes and mask_paths:
            raise ValueError(f"{loc_file}: mixes box lines and mask lines")
    records = []
    for image_id in ids:
        if labels_file.is_file() and image_id not in labels:
            raise ValueError(f"{labels_file}: no label for {image_id}")
        path = images_root / image_id
        records.append(
            SourceRecord(
                image_id=image_id,
                label=labels.get(image_id, -1),
                boxes=tuple(boxes.get(image_id, ())),
                path=str(path),
                mask_paths=tuple(mask_paths.get(image_id, ())),
                ignore_path=ignore_paths.get(image_id),
                expected_size=sizes.get(image_id),
                size_hint=_size(path),
            )
        )
    if has_masks:
        lacking = [r.image_id for r in records if not r.mask_paths]
        if lacking:
            raise ValueError(f"{loc_file}: no mask for {lacking[:3]} (every image of a mask split needs one)")
    return records, has_masks


def convert_wsolmeta(
    images_root: str | Path,
    metadata_dir: str | Path,
    out_dir: str | Path,
    *,
    splits: Sequence[str] | None = None,
    dataset: str | None = None,
    masks_root: str | Path | None = None,
    split_images: dict[str, str | Path] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] = (),
    options: WriterOptions = WriterOptions(),
) -> dict[str, WriteResult]:
    """Convert a wsolevaluation metadata folder (e.g. ``metadata/CUB``) with its images.

    ``split_images`` overrides the image root per split (CUBV2's val images may live apart).
    The number of classes is the largest label + 1 over the converted splits unless given.
    """
    metadata_dir = Path(metadata_dir)
    names = (
        list(splits) if splits else sorted(p.name for p in metadata_dir.iterdir() if (p / "image_ids.txt").is_file())
    )
    if not names:
        raise FileNotFoundError(f"{metadata_dir}: no split folder with an image_ids.txt")
    per_split = {}
    for split in names:
        root = (split_images or {}).get(split, images_root)
        per_split[split] = read_wsolmeta_split(metadata_dir / split, root, masks_root=masks_root)
    max_label = max((r.label for recs, _ in per_split.values() for r in recs), default=-1)
    k = num_classes if num_classes is not None else max_label + 1
    if max_label >= k:
        raise ValueError(f"label {max_label} does not fit num_classes={k}")
    results = {}
    for split, (records, has_masks) in per_split.items():
        labeled = all(r.label >= 0 for r in records)
        results[split] = write_split(
            out_dir,
            split,
            records,
            _materializer(options),
            dataset=dataset or metadata_dir.name,
            num_classes=k,
            class_names=class_names,
            labeled=labeled,
            has_masks=has_masks,
            options=options,
        )
    return results


# ---------------------------------------------------------------------------------------------
# Raw CUB-200-2011
# ---------------------------------------------------------------------------------------------


def _id_table(path: Path) -> dict[int, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a CUB_200_2011 folder")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            head, *rest = line.split()
            out[int(head)] = rest
    return out


def cub_records(root: str | Path) -> tuple[dict[str, list[SourceRecord]], list[str]]:
    """Records of the raw CUB-200-2011 release by split (``train``/``test``), and the class names."""
    root = Path(root)
    images = _id_table(root / "images.txt")
    labels = _id_table(root / "image_class_labels.txt")
    boxes = _id_table(root / "bounding_boxes.txt")
    is_train = _id_table(root / "train_test_split.txt")
    classes = _id_table(root / "classes.txt")
    class_names = [classes[i][0] for i in sorted(classes)]
    out: dict[str, list[SourceRecord]] = {"train": [], "test": []}
    for image_num in sorted(images):
        rel = images[image_num][0]
        if image_num not in labels or image_num not in is_train:
            raise ValueError(f"{root}: image {image_num} ({rel}) lacks a label or a train/test flag")
        label = int(labels[image_num][0]) - 1  # the release is 1-based
        if not 0 <= label < len(class_names):
            raise ValueError(
                f"{root / 'image_class_labels.txt'}: class {label + 1} of image {image_num} is not in classes.txt"
            )
        box: tuple[tuple[float, float, float, float], ...] = ()
        if image_num in boxes:
            x, y, w, h = (float(v) for v in boxes[image_num])
            box = ((x, y, x + w, y + h),)
        path = root / "images" / rel
        split = "train" if is_train[image_num][0] == "1" else "test"
        out[split].append(SourceRecord(rel, label, box, str(path), size_hint=_size(path)))
    return out, class_names


def convert_cub(
    root: str | Path, out_dir: str | Path, *, options: WriterOptions = WriterOptions()
) -> dict[str, WriteResult]:
    """Convert the raw CUB-200-2011 release (train and test splits)."""
    per_split, class_names = cub_records(root)
    return {
        split: write_split(
            out_dir,
            split,
            records,
            _materializer(options),
            dataset="CUB-200-2011",
            num_classes=len(class_names),
            class_names=class_names,
            options=options,
        )
        for split, records in per_split.items()
        if records
    }


# ---------------------------------------------------------------------------------------------
# Raw ImageNet-1K (ILSVRC2012) with PASCAL-VOC box files
# ---------------------------------------------------------------------------------------------


def parse_voc_xml(
    path: str | Path,
) -> tuple[tuple[int, int] | None, list[tuple[str, tuple[float, float, float, float]]]]:
    """``(width, height)`` (None when absent or zero) and ``[(synset, (x0, y0, x1, y1)), ...]``."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        raise ValueError(f"{path}: not valid XML ({exc})") from None
    root = tree.getroot()
    size = None
    size_el = root.find("size")
    if size_el is not None:
        w, h = size_el.findtext("width"), size_el.findtext("height")
        if w and h and int(float(w)) > 0 and int(float(h)) > 0:
            size = (int(float(w)), int(float(h)))
    objects: list[tuple[str, tuple[float, float, float, float]]] = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(tag) or "nan") for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise ValueError(f"{path}: non-numeric box coordinates") from None
        objects.append((name, (x0, y0, x1, y1)))
    return size, objects


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def imagenet_records(
    train_dir: str | Path | None,
    val_dir: str | Path | None,
    boxes_dir: str | Path | None,
) -> tuple[dict[str, list[SourceRecord]], list[str]]:
    """Records of raw ImageNet folders by split, and the sorted synset ids (class ``i`` = ``synsets[i]``)."""
    xml_by_stem: dict[str, Path] = {}
    if boxes_dir is not None:
        for dirpath, _, files in os.walk(boxes_dir):
            for f in files:
                if f.lower().endswith(".xml"):
                    xml_by_stem[f[: -len(".xml")]] = Path(dirpath) / f
    train_dir = Path(train_dir) if train_dir else None
    val_dir = Path(val_dir) if val_dir else None
    if train_dir is not None:
        synsets = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    elif val_dir is not None and any(p.is_dir() for p in val_dir.iterdir()):
        synsets = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    else:
        raise ValueError("need --train (class folders) or a val folder with class folders to know the classes")
    if not synsets:
        raise ValueError(f"{train_dir}: no class folders")
    index = {s: i for i, s in enumerate(synsets)}

    def record(path: Path, rel: str, synset: str) -> SourceRecord:
        xml = xml_by_stem.get(path.stem)
        boxes: list[tuple[float, float, float, float]] = []
        size = None
        if xml is not None:
            size, objects = parse_voc_xml(xml)
            boxes = [b for name, b in objects if name == synset]
        return SourceRecord(rel, index[synset], tuple(boxes), str(path), expected_size=size, size_hint=_size(path))

    out: dict[str, list[SourceRecord]] = {}
    if train_dir is not None:
        recs = []
        for synset in synsets:
            for p in _images_in(train_dir / synset):
                recs.append(record(p, f"{synset}/{p.name}", synset))
        out["train"] = recs
    if val_dir is not None:
        recs = []
        class_dirs = sorted(p for p in val_dir.iterdir() if p.is_dir())
        if class_dirs:
            for d in class_dirs:
                if d.name not in index:
                    raise ValueError(f"{d}: synset {d.name} is not among the training classes")
                for p in _images_in(d):
                    recs.append(record(p, f"{d.name}/{p.name}", d.name))
        else:
            for p in _images_in(val_dir):
                xml = xml_by_stem.get(p.stem)
                if xml is None:
                    raise ValueError(f"{p}: flat val folder but no box XML to give its class (pass --boxes)")
                _, objects = parse_voc_xml(xml)
                names = {n for n, _ in objects}
                if len(names) != 1 or next(iter(names)) not in index:
                    raise ValueError(f"{xml}: cannot tell the class of {p.name} (objects {sorted(names)})")
                recs.append(record(p, p.name, next(iter(names))))
        out["val"] = recs
    return out, synsets


def convert_imagenet(
    train_dir: str | Path | None,
    val_dir: str | Path | None,
    boxes_dir: str | Path | None,
    out_dir: str | Path,
    *,
    synset_words: str | Path | None = None,
    options: WriterOptions = WriterOptions(),
) -> dict[str, WriteResult]:
    """Convert raw ImageNet folders; ``synset_words`` (``nXXXX name`` lines) names the classes."""
    per_split, synsets = imagenet_records(train_dir, val_dir, boxes_dir)
    names = synsets
    if synset_words is not None:
        words = {}
        for line in Path(synset_words).read_text().splitlines():
            if line.strip():
                wnid, _, text = line.partition(" ")
                words[wnid] = text.strip()
        names = [f"{s} {words[s]}" if s in words else s for s in synsets]
    return {
        split: write_split(
            out_dir,
            split,
            records,
            _materializer(options),
            dataset="ILSVRC2012",
            num_classes=len(synsets),
            class_names=names,
            options=options,
        )
        for split, records in per_split.items()
        if records
    }
