"""The pseudo-box sidecar (wsol_core/data/pseudo_boxes.py): its round trip, resume, the checks that
tie it to one version of a split, and the quality figures against GT boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import good_split, sample_members, write_raw_split

from wsol_core.data.manifest import load_manifest
from wsol_core.data.pseudo_boxes import (
    HEADER,
    PseudoBox,
    SidecarError,
    SidecarWriter,
    new_header,
    quality,
    read_boxes,
    read_header,
    verify_sidecar,
    write_header,
)

SOURCE = {"checkpoint": "/runs/c2am/checkpoint_000004", "method": "c2am", "map": "class-agnostic"}


def _boxes(keys):
    return [PseudoBox(k, (1, 2, 30 + i, 40), 64, 48) for i, k in enumerate(keys)]


def _sidecar(tmp_path, keys, world=2):
    out = tmp_path / "pseudo"
    write_header(out, new_header(tmp_path / "train", "fixed", 0.2, SOURCE))
    for rank in range(world):
        with SidecarWriter(out, rank, world) as writer:
            writer.add(_boxes(keys)[rank::world])
    return out


def test_round_trip_over_ranks_with_the_split_identity(tmp_path):
    keys = good_split(tmp_path / "train", n=7)
    out = _sidecar(tmp_path, keys)
    header = verify_sidecar(out, tmp_path / "train", keys)
    assert header.num_samples == 7 and header.threshold == 0.2 and header.source == SOURCE
    assert header.split == load_manifest(tmp_path / "train").split
    assert read_boxes(out) == {b.key: b for b in _boxes(keys)}
    assert json.loads((out / HEADER).read_text())["format"] == "wsol-pseudo-boxes/1"


def test_a_resumed_writer_skips_what_is_written_and_drops_a_torn_last_line(tmp_path):
    keys = good_split(tmp_path / "train", n=6)
    out = tmp_path / "pseudo"
    write_header(out, new_header(tmp_path / "train", "best_val", 0.15, SOURCE))
    with SidecarWriter(out) as writer:
        assert writer.add(_boxes(keys)[:3]) == 3
    path = out / "boxes-rank0-of-1.jsonl"
    path.write_text(path.read_text() + '{"key": "s003", "box": [1, 2')  # killed mid-line
    with SidecarWriter(out) as writer:
        assert writer.done == set(keys[:3])
        assert writer.add(_boxes(keys)) == 3  # only the three not yet written
    assert sorted(read_boxes(out)) == keys and path.read_text().count("\n") == 6  # the torn line is gone
    verify_sidecar(out, tmp_path / "train", keys)


def test_a_sidecar_of_another_split_version_is_refused_by_name(tmp_path):
    keys = good_split(tmp_path / "train", n=5)
    out = _sidecar(tmp_path, keys)
    # The split is rewritten (one more sample): its dataset.json, so its SHA-256, changes.
    shards = [[m for k in [*keys, "s999"] for m in sample_members(k, seed=1)]]
    write_raw_split(tmp_path / "train", shards, num_classes=3)
    with pytest.raises(
        SidecarError, match=r"pseudo: written for a split whose dataset\.json has SHA-256 .* extract the boxes again"
    ):
        verify_sidecar(out, tmp_path / "train")


def test_counts_keys_and_headers_that_do_not_match_are_named(tmp_path):
    keys = good_split(tmp_path / "train", n=6)
    out = _sidecar(tmp_path, keys[:5])
    with pytest.raises(SidecarError, match=r"5 boxes and 0 skipped samples for the split's 6 samples"):
        verify_sidecar(out, tmp_path / "train", keys)
    with SidecarWriter(out, 0, 2) as writer:
        writer.add([PseudoBox("not-a-key", (0, 0, 3, 3), 64, 48)])
    with pytest.raises(
        SidecarError, match=r"1 missing \(e\.g\. \['s005'\]\), 1 not in the split \(e\.g\. \['not-a-key'\]\)"
    ):
        verify_sidecar(out, tmp_path / "train", keys)
    with pytest.raises(
        SidecarError, match=r"holds pseudo boxes of another extraction \(threshold: 0\.2, threshold_rule: 'fixed'\)"
    ):
        write_header(out, new_header(tmp_path / "train", "best_val", 0.3, SOURCE))
    with pytest.raises(SidecarError, match=r"no pseudo_boxes\.json; not a pseudo-box sidecar"):
        read_header(tmp_path / "train")
    with pytest.raises(SidecarError, match=r"threshold rule 'median' is not"):
        new_header(tmp_path / "train", "median", 0.2, SOURCE)
    with pytest.raises(SidecarError, match=r"no dataset\.json"):
        new_header(tmp_path / "nowhere", "fixed", 0.2, SOURCE)


def test_bad_lines_and_conflicting_duplicates_are_named(tmp_path):
    keys = good_split(tmp_path / "train", n=2)
    out = _sidecar(tmp_path, keys, world=1)
    (out / "boxes-rank0-of-2.jsonl").write_text(PseudoBox(keys[0], (0, 0, 5, 5), 64, 48).to_line())
    with pytest.raises(SidecarError, match=r"key 's000' has two different boxes"):
        read_boxes(out)
    (out / "boxes-rank0-of-2.jsonl").write_text('{"key": "s000", "box": [0, 0, 70, 5], "width": 64, "height": 48}\n')
    with pytest.raises(
        SidecarError, match=r"boxes-rank0-of-2\.jsonl:1: box \[0, 0, 70, 5\] of 's000' is not inside its 64x48 image"
    ):
        read_boxes(out)
    (out / "boxes-rank0-of-2.jsonl").write_text('{"key": "s000"}\n')
    with pytest.raises(SidecarError, match=r"boxes-rank0-of-2\.jsonl:1: not a pseudo-box line \(KeyError"):
        read_boxes(out)


def test_quality_is_corloc_and_mean_best_iou_against_the_gt_boxes():
    gt = {
        "a": np.array([[0, 0, 9, 9]]),  # the pseudo box equals it: IoU 1
        "b": np.array([[0, 0, 9, 9], [20, 20, 29, 29]]),  # best of two GT boxes: [0, 0, 9, 4] -> 50/100
        "c": np.array([[0, 0, 9, 9]]),  # [5, 0, 14, 9] overlaps 50 of 150 pixels: IoU 1/3
    }
    boxes = {
        "a": PseudoBox("a", (0, 0, 9, 9), 40, 40),
        "b": PseudoBox("b", (0, 0, 9, 4), 40, 40),
        "c": PseudoBox("c", (5, 0, 14, 9), 40, 40),
        "no-gt": PseudoBox("no-gt", (0, 0, 1, 1), 40, 40),  # not scored
    }
    got = quality(boxes, gt)
    assert got["images"] == 3
    assert got["corloc"] == pytest.approx(100 * 2 / 3)  # IoU 1 and 0.5 count, 1/3 does not
    assert got["mean_iou"] == pytest.approx(100 * (1 + 0.5 + 1 / 3) / 3)
    assert np.isnan(quality({}, gt)["corloc"])
