"""Localization metrics: the reference evaluator's vectors, hand-computed cases, bad input, state.

The vectors in ``shared/vectors/maxboxacc_public.npz`` were made with the field's reference
evaluator (Choe et al., CVPR 2020); the multi-contour IoUs must be reproduced bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wsol_core.metrics import (
    MaxBoxAccumulator,
    PxAPAccumulator,
    best_iou_per_threshold,
    cut_level_table,
    default_thresholds,
    normalize_maps,
    prepare_float_maps,
    prepare_maps,
    pxap,
    quantize_maps,
    rescale_boxes,
)
from wsol_core.metrics.reference import (
    reference_best_iou,
    reference_iou,
    reference_normalize,
    reference_pxap,
    reference_rescale_boxes,
)

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "maxboxacc_public.npz"
THR_01 = np.arange(0, 1, 0.01)


# ---------------------------------------------------------------------------------------------
# The reference evaluator's vectors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, np.ndarray]:
    if not VECTORS.exists():
        pytest.skip(f"reference vectors not found at {VECTORS}")
    with np.load(VECTORS) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def vector_boxes(vectors) -> list[torch.Tensor]:
    """GT boxes rescaled to 224 with this package's rescale_boxes."""
    boxes = vectors["boxes"]
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(len(vectors["maps"]))]
    return rescale_boxes(per_image, vectors["sizes"])


def test_rescale_boxes_matches_protocol_on_vectors(vectors, vector_boxes):
    boxes, sizes = vectors["boxes"], vectors["sizes"]
    for i, ours in enumerate(vector_boxes):
        width, height = sizes[i]
        expected = reference_rescale_boxes(boxes[boxes[:, 0] == i, 1:], width, height)
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_vectors_iou_001_exact_with_box_counts(vectors, vector_boxes):
    iou, num_boxes = best_iou_per_threshold(vectors["maps"], vector_boxes, vectors["thr_001"], return_num_boxes=True)
    assert np.array_equal(num_boxes, vectors["nbox_001"])
    assert np.array_equal(iou, vectors["iou_001"])


def test_vectors_iou_01_exact(vectors, vector_boxes):
    iou = best_iou_per_threshold(torch.from_numpy(vectors["maps"]), vector_boxes, vectors["thr_01"])
    assert np.array_equal(iou, vectors["iou_01"])


@pytest.mark.parametrize("interval", ["001", "01"])
def test_vectors_maxboxacc_exact(vectors, vector_boxes, interval):
    acc = MaxBoxAccumulator(vectors[f"thr_{interval}"])
    # Two batches, to exercise accumulation.
    acc.update(vectors["maps"][:50], vector_boxes[:50])
    acc.update(vectors["maps"][50:], vector_boxes[50:])
    result = acc.compute()
    expected = vectors[f"maxboxacc_{interval}"]
    assert [result.max_box_acc[d] for d in (30, 50, 70)] == expected.tolist()
    assert result.max_box_acc_v2 == pytest.approx(expected.mean(), abs=1e-12)
    assert result.num_images == len(vectors["maps"])


def test_vectors_float_maps_quantize_back_exactly(vectors):
    scores = torch.from_numpy(np.minimum((vectors["maps"].astype(np.float64) + 0.5) / 255, 1))
    assert torch.equal(quantize_maps(scores), torch.from_numpy(vectors["maps"]))


def test_vectors_maxboxacc_v1(vectors, vector_boxes):
    acc = MaxBoxAccumulator(vectors["thr_01"], iou_deltas=(50,), largest_contour=True)
    acc.update(vectors["maps"], vector_boxes)
    assert abs(acc.compute().max_box_acc[50] - vectors["maxboxacc_v1_01"][1]) <= 0.5
    # Stronger: the per-image largest-contour IoUs agree too (no cross-depth area ties here).
    iou_v1 = best_iou_per_threshold(vectors["maps"], vector_boxes, vectors["thr_01"], largest_contour=True)
    assert np.array_equal(iou_v1, vectors["iou_v1_01"])


def test_vectors_pxap(vectors):
    k = len(vectors["pxap_gt"])
    scores = np.minimum((vectors["maps"][:k].astype(np.float64) + 0.5) / 255, 1)
    assert abs(pxap(scores, vectors["pxap_gt"], vectors["thr_01"]) - float(vectors["pxap_01"])) <= 1e-9
    # Streaming in batches with merge gives the same number.
    a, b = PxAPAccumulator(vectors["thr_01"]), PxAPAccumulator(vectors["thr_01"])
    a.update(scores[:20], vectors["pxap_gt"][:20])
    b.update(scores[20:], vectors["pxap_gt"][20:])
    assert abs(a.merge(b).compute().pxap - float(vectors["pxap_01"])) <= 1e-9


# ---------------------------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------------------------


def _one(map_2d: np.ndarray, boxes, thresholds=THR_01, **kwargs):
    return best_iou_per_threshold(map_2d[None].astype(np.uint8), [np.asarray(boxes)], thresholds, **kwargs)


def test_iou_inclusive_corners():
    assert reference_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 1.0
    # 2x2 boxes overlapping in one pixel: 1 / (4 + 4 - 1).
    assert reference_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]])[0, 0] == 1 / 7
    assert reference_iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0


def test_single_square_box_is_one_past_the_far_pixel():
    score = np.zeros((224, 224), np.uint8)
    score[10:20, 20:30] = 200  # pixels x 20..29, y 10..19
    # The protocol's box is (x, y, x + w, y + h) = (20, 10, 30, 20): 11 x 11 with inclusive corners.
    iou, count = _one(score, [[20, 10, 29, 19]], return_num_boxes=True)
    assert np.all(count == 1)
    assert np.all(iou == 100 / 121)
    iou = _one(score, [[20, 10, 30, 20]])
    assert np.all(iou == 1.0)


def test_far_corner_clipped_to_223():
    score = np.zeros((224, 224), np.uint8)
    score[214:, 214:] = 255
    assert np.all(_one(score, [[214, 214, 223, 223]]) == 1.0)


def test_no_contour_scores_the_zero_box():
    score = np.zeros((224, 224), np.uint8)
    iou, count = _one(score, [[0, 0, 1, 1]], return_num_boxes=True)
    # Box (0, 0, 0, 0) is one pixel; against a 2x2 GT box: 1 / 4.
    assert np.all(count == 1) and np.all(iou == 0.25)
    assert np.all(_one(score, [[5, 5, 9, 9]]) == 0.0)


def test_ring_gives_outer_and_hole_boxes():
    score = np.zeros((40, 40), np.uint8)
    score[5:30, 5:30] = 255
    score[10:20, 12:25] = 0  # hole: x 12..24, y 10..19
    iou, count = _one(score, [[11, 9, 26, 21]], return_num_boxes=True)
    assert np.all(count == 2)
    # Hole contour box = hole bbox grown by one pixel, far corner one past: (11, 9, 26, 21).
    assert np.all(iou == 1.0)


def test_largest_contour_keeps_only_the_biggest_region():
    score = np.zeros((60, 60), np.uint8)
    score[2:6, 2:6] = 255  # small square
    score[20:50, 20:50] = 255  # big square
    small_gt = [[2, 2, 6, 6]]
    assert np.all(_one(score, small_gt) == 1.0)
    assert np.all(_one(score, small_gt, largest_contour=True) == 0.0)
    assert np.all(_one(score, [[20, 20, 50, 50]], largest_contour=True) == 1.0)


def test_maps_larger_than_uint16_nodes_match_reference():
    # 260 x 260 pixels + the frame node do not fit uint16 parents: the int32 kernel runs.
    maps = prepare_maps(torch.from_numpy(_cams(2, 9, seed=11)), size=260).numpy()
    maps[1, 100:140, 100:140] = 0  # a hole
    boxes = [np.array([[20, 30, 200, 180]]), np.array([[99, 99, 140, 140]])]
    thresholds = np.arange(0, 1, 0.05)
    fast, count = best_iou_per_threshold(maps, boxes, thresholds, return_num_boxes=True)
    ref, ref_count = reference_best_iou(maps, boxes, thresholds, return_num_boxes=True)
    assert np.array_equal(fast, ref) and np.array_equal(count, ref_count)


def test_cut_level_table_matches_python_int_of_product():
    thresholds = default_thresholds(0.001)
    table = cut_level_table(thresholds)
    expected = np.array([[int(t * np.uint8(m)) for t in thresholds] for m in range(256)])
    assert table.shape == (256, 1000) and np.array_equal(table, expected)


def test_thresholds_pick_the_cut_level():
    # Values 0, 100, 200: threshold t keeps pixels > int(t * 200).
    score = np.zeros((30, 30), np.uint8)
    score[2:10, 2:10] = 100
    score[4:6, 4:6] = 200
    thresholds = np.array([0.0, 0.49, 0.5, 0.99])
    iou = _one(score, [[2, 2, 10, 10]], thresholds)
    small = reference_iou([[4, 4, 6, 6]], [[2, 2, 10, 10]])[0, 0]
    # 0.49 * 200 = 98 keeps the 100s; 0.5 * 200 = 100 keeps only the 200s.
    assert iou.tolist() == [[1.0, 1.0, small, small]]


# ---------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------


def _cams(n: int, h: int, seed: int) -> np.ndarray:
    """CAM-like maps: smooth non-negative low-resolution activations."""
    rng = np.random.default_rng(seed)
    cams = rng.random((n, h, h)).astype(np.float32)
    return np.maximum(cams - 0.3, 0) * rng.uniform(0.5, 20, (n, 1, 1)).astype(np.float32)


def test_prepare_maps_vs_opencv_bicubic_measured():
    """torch bicubic vs cv2.resize(INTER_CUBIC): same kernel, float32 rounding differs.

    Measured on this setup: ~5e-6 of the uint8 pixels differ (by exactly 1) for upsampled maps.
    """
    cv2 = pytest.importorskip("cv2")
    from wsol_core.metrics.reference import reference_prepare

    for side in (7, 14, 28):
        cams = _cams(64, side, seed=side)
        ours = prepare_maps(torch.from_numpy(cams)).numpy().astype(int)
        ref = np.stack([reference_prepare(c)[1] for c in cams]).astype(int)
        diff = np.abs(ours - ref)
        assert diff.max() <= 1
        assert (diff > 0).mean() < 1e-4, f"{side}x{side}: {(diff > 0).mean():.2e} of pixels differ"
    # Given the same resized map, normalization and quantization are bit-exact.
    resized = np.stack([cv2.resize(c, (224, 224), interpolation=cv2.INTER_CUBIC) for c in _cams(16, 14, 1)])
    expected = np.stack([reference_normalize(r) for r in resized])
    assert torch.equal(normalize_maps(torch.from_numpy(resized)), torch.from_numpy(expected))
    assert np.array_equal(prepare_maps(torch.from_numpy(resized)).numpy(), (expected * 255).astype(np.uint8))


def test_prepare_maps_constant_and_nan_maps_become_zero():
    maps = torch.rand(3, 14, 14)
    maps[1] = 0.7
    maps[2, 3, 4] = float("nan")
    out = prepare_maps(maps)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert out[0].max() == 255 and out[0].min() == 0
    assert not out[1].any() and not out[2].any()


def test_rescale_boxes_truncates_per_coordinate():
    out = rescale_boxes([np.array([[0, 10, 99, 199]])], [(100, 200)])
    # 99 * 224 / 100 = 221.76 -> 221; 10 * 224 / 200 = 11.2 -> 11; 199 * 224 / 200 = 222.88 -> 222.
    assert out[0].tolist() == [[0, 11, 221, 222]]


# ---------------------------------------------------------------------------------------------
# Accumulators
# ---------------------------------------------------------------------------------------------


def _random_batch(n: int, seed: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps = prepare_maps(torch.from_numpy(_cams(n, 14, seed)))
    boxes = []
    for _ in range(n):
        x0, y0 = rng.integers(0, 150, 2)
        w, h = rng.integers(10, 70, 2)
        boxes.append(np.array([[x0, y0, x0 + w, y0 + h]]))
    return maps, boxes


def test_accumulator_merge_equals_one_big_update():
    thresholds = default_thresholds(0.01)
    maps, boxes = _random_batch(24, seed=3)
    whole = MaxBoxAccumulator(thresholds)
    whole.update(maps, boxes)
    part_a, part_b = MaxBoxAccumulator(thresholds), MaxBoxAccumulator(thresholds)
    part_a.update(maps[:10], boxes[:10])
    part_b.update(maps[10:], boxes[10:])
    assert torch.equal(part_a.merge(part_b).state_tensor(), whole.state_tensor())
    assert part_a.compute().max_box_acc == whole.compute().max_box_acc
    # And the counts are those of the reference evaluator.
    ref = reference_best_iou(maps.numpy(), boxes, thresholds)
    for row, delta in enumerate(whole.iou_deltas):
        assert np.array_equal(whole.correct[row].numpy(), (ref >= delta / 100).sum(0))
    from_iou = MaxBoxAccumulator(thresholds)
    from_iou.update_from_iou(ref)
    assert torch.equal(from_iou.state_tensor(), whole.state_tensor())


def test_state_tensor_round_trip():
    thresholds = default_thresholds(0.01)
    maps, boxes = _random_batch(8, seed=4)
    acc = MaxBoxAccumulator(thresholds)
    acc.update(maps, boxes, class_scores=torch.randn(8, 10), labels=torch.arange(8))
    state = acc.state_tensor()
    assert state.shape == (3 + 2, len(thresholds) + 1) and state.dtype == torch.int64
    clone = MaxBoxAccumulator.from_state_tensor(state, thresholds)
    assert clone.compute().max_box_acc == acc.compute().max_box_acc
    assert clone.compute().top5_loc == acc.compute().top5_loc
    # Summing two ranks' states (what all_reduce does) doubles every count.
    acc.load_state_tensor(state + state)
    assert acc.num_images == 16 and torch.equal(acc.correct, 2 * clone.correct)
    with pytest.raises(ValueError, match="shape"):
        acc.load_state_tensor(torch.zeros(3, len(thresholds)))


def test_state_does_not_grow_with_images():
    thresholds = default_thresholds(0.001)
    acc = MaxBoxAccumulator(thresholds)
    maps, boxes = _random_batch(4, seed=5)
    for _ in range(40):
        acc.update(maps, boxes)
        assert acc.correct.shape == (3, 1000)
        assert acc.state_tensor().shape == (5, 1001)
    assert acc.num_images == 160


def test_top1_top5_and_gt_known_loc():
    score = np.zeros((4, 64, 64), np.uint8)
    score[:, 10:30, 10:30] = 255
    perfect = np.array([[10, 10, 30, 30]])
    off = np.array([[40, 40, 60, 60]])  # IoU 0 with the predicted box
    boxes = [perfect, perfect, perfect, off]
    labels = torch.tensor([0, 1, 2, 3])
    scores = torch.arange(10, 0, -1.0).repeat(4, 1)  # class c ranked c + 1
    # Image 0: label ranked 1st. Image 1: 2nd (top-5 only). Image 2: pushed to last (neither).
    # Image 3: label ranked 1st but the box misses (counts for nothing).
    scores[2, 2] = -5.0
    scores[3, 3] = 100.0
    acc = MaxBoxAccumulator(default_thresholds(0.01))
    acc.update(score, boxes, class_scores=scores, labels=labels)
    result = acc.compute()
    assert result.gt_known_loc == 75.0 and result.corloc == 75.0
    assert result.top1_loc == 25.0
    assert result.top5_loc == 50.0
    assert result.loc_threshold == 0.0


def test_update_raw_equals_prepared_update():
    rng = np.random.default_rng(6)
    cams = torch.from_numpy(_cams(6, 14, 6))
    sizes = torch.from_numpy(rng.integers(100, 600, (6, 2)))
    boxes = [torch.tensor([[5.0, 5.0, float(w) - 10, float(h) - 20]]) for w, h in sizes.tolist()]
    raw = MaxBoxAccumulator(default_thresholds(0.01))
    raw.update_raw(cams, boxes, sizes)
    prepared = MaxBoxAccumulator(default_thresholds(0.01))
    prepared.update(prepare_maps(cams), rescale_boxes(boxes, sizes))
    assert torch.equal(raw.state_tensor(), prepared.state_tensor())
    assert raw.num_images == 6


def test_mixed_class_scores_are_refused():
    acc = MaxBoxAccumulator(default_thresholds(0.1))
    maps, boxes = _random_batch(2, seed=7)
    acc.update(maps, boxes, class_scores=torch.randn(2, 5), labels=torch.tensor([0, 1]))
    acc.update(maps, boxes)
    with pytest.raises(ValueError, match="class scores were given for 2 of 4"):
        acc.compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_and_state_match_cpu():
    thresholds = default_thresholds(0.001)
    cams = torch.from_numpy(_cams(16, 14, 8))
    sizes = torch.full((16, 2), 224)
    boxes = [torch.tensor([[20, 30, 120, 150]]) for _ in range(16)]
    cpu = MaxBoxAccumulator(thresholds)
    cpu.update_raw(cams, boxes, sizes)
    gpu = MaxBoxAccumulator(thresholds, device="cuda")
    gpu.update_raw(cams.cuda(), boxes, sizes)
    assert gpu.state_tensor().device.type == "cuda"
    # Resampling on the GPU may round differently from the CPU; the counts must stay close.
    assert (gpu.state_tensor().cpu() - cpu.state_tensor()).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# PxAP
# ---------------------------------------------------------------------------------------------


def test_pxap_perfect_separation_and_ignore():
    scores = np.full((2, 8, 8), 0.1)
    masks = np.zeros((2, 8, 8), np.uint8)
    scores[:, 2:5, 2:5] = 0.9
    masks[:, 2:5, 2:5] = 1
    assert pxap(scores, masks, THR_01) == pytest.approx(100.0, abs=1e-12)
    # A high-scoring background pixel hurts, unless it is marked ignore (255).
    scores[0, 7, 7] = 0.95
    assert pxap(scores, masks, THR_01) < 100.0
    masks[0, 7, 7] = 255
    assert pxap(scores, masks, THR_01) == pytest.approx(100.0, abs=1e-12)


def test_pxap_matches_reference_on_random_maps():
    rng = np.random.default_rng(9)
    scores = rng.random((6, 32, 32))
    masks = rng.choice(np.array([0, 1, 255], np.uint8), size=(6, 32, 32), p=[0.6, 0.3, 0.1])
    scores[masks == 1] = np.minimum(scores[masks == 1] + 0.3, 1.0)
    thresholds = default_thresholds(0.001)
    assert pxap(scores, masks, thresholds) == pytest.approx(reference_pxap(scores, masks, thresholds), abs=1e-9)
    acc = PxAPAccumulator(thresholds)
    acc.update(scores, masks)
    clone = PxAPAccumulator(thresholds)
    clone.load_state_tensor(acc.state_tensor())
    assert clone.compute().pxap == acc.compute().pxap


def test_pxap_update_raw_prepares_float_maps_at_mask_size():
    cams = torch.from_numpy(_cams(4, 14, seed=10))
    masks = np.zeros((4, 224, 224), np.uint8)
    masks[:, 60:160, 50:150] = 1
    masks[:, :5] = 255
    raw, prepared = PxAPAccumulator(THR_01), PxAPAccumulator(THR_01)
    raw.update_raw(cams, masks)
    prepared.update(prepare_float_maps(cams), masks)
    assert torch.equal(raw.state_tensor(), prepared.state_tensor())
    assert int(raw.state_tensor().sum()) == int((masks != 255).sum())


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the image index
# ---------------------------------------------------------------------------------------------


def test_bad_map_dtype_and_shape():
    gt = [np.array([[0, 0, 5, 5]])]
    with pytest.raises(ValueError, match="uint8"):
        best_iou_per_threshold(np.zeros((1, 10, 10), np.float32), gt, THR_01)
    with pytest.raises(ValueError, match=r"\[N, H, W\].*\(10, 10\)"):
        best_iou_per_threshold(np.zeros((10, 10), np.uint8), gt, THR_01)
    with pytest.raises(ValueError, match="floating point"):
        prepare_maps(torch.zeros(2, 7, 7, dtype=torch.int64))


def test_inf_map_names_index():
    maps = torch.rand(4, 14, 14)
    maps[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"maps\[2\] contains inf"):
        prepare_maps(maps)
    acc = MaxBoxAccumulator(THR_01)
    with pytest.raises(ValueError, match=r"maps\[2\]"):
        acc.update_raw(maps, [np.array([[0, 0, 5, 5]])] * 4, torch.full((4, 2), 100))


def test_float_maps_outside_unit_range_name_index():
    maps = torch.rand(3, 8, 8)
    maps[1, 2, 2] = 1.5
    with pytest.raises(ValueError, match=r"maps\[1\].*outside \[0, 1\]"):
        quantize_maps(maps)
    maps[1, 2, 2] = float("nan")  # a NaN map is not an error: it becomes zeros
    out = quantize_maps(maps)
    assert not out[1].any() and out[0].any()


def test_bad_gt_boxes_name_index():
    maps = np.zeros((3, 224, 224), np.uint8)
    good = np.array([[0, 0, 10, 10]])
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] box 0 \[5, 0, 4, 10\] is inverted"):
        best_iou_per_threshold(maps, [good, np.array([[5, 0, 4, 10]]), good], THR_01)
    with pytest.raises(ValueError, match=r"gt_boxes\[2\] box 1 .* leaves the 224x224 map"):
        best_iou_per_threshold(maps, [good, good, np.array([[0, 0, 5, 5], [0, 0, 225, 10]])], THR_01)
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] box 0 .* leaves"):
        best_iou_per_threshold(maps, [np.array([[-1, 0, 5, 5]]), good, good], THR_01)
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] must be \[k >= 1, 4\]"):
        best_iou_per_threshold(maps, [good, np.zeros((0, 4)), good], THR_01)
    with pytest.raises(ValueError, match="got 2 GT box arrays for 3 maps"):
        best_iou_per_threshold(maps, [good, good], THR_01)


def test_gt_box_on_the_far_edge_is_scored_like_the_reference():
    """A box whose far corner is the image width / height (``x1 == W`` after rescaling) is scored
    by the protocol's arithmetic IoU, not rejected; one pixel further still raises."""
    rng = np.random.default_rng(3)
    maps = prepare_maps(torch.rand(6, 14, 14, generator=torch.Generator().manual_seed(3))).numpy()
    sizes = np.array([[300, 200]] * 6)
    original = [np.array([[int(rng.integers(0, 150)), int(rng.integers(0, 100)), 300, 200]]) for _ in range(6)]
    boxes = [b.numpy() for b in rescale_boxes(original, sizes)]
    assert all(b[0, 2] == 224 and b[0, 3] == 224 for b in boxes)  # the far corner lands on the side
    thresholds = np.arange(0, 1, 0.01)
    ours = best_iou_per_threshold(maps, boxes, thresholds)
    theirs = reference_best_iou(maps, boxes, thresholds)
    np.testing.assert_array_equal(ours, theirs)
    v1 = best_iou_per_threshold(maps, boxes, thresholds, largest_contour=True)
    np.testing.assert_array_equal(v1, reference_best_iou(maps, boxes, thresholds, largest_contour=True))
    with pytest.raises(ValueError, match="leaves the 224x224 map"):
        best_iou_per_threshold(maps[:1], [np.array([[0, 0, 225, 224]])], thresholds)


def test_bad_masks_name_index():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[2, 1, 1] = 7
    with pytest.raises(ValueError, match=r"masks\[2\] has values \[0, 7\]"):
        pxap(np.zeros((3, 8, 8)), masks, THR_01)


def test_bad_thresholds_and_deltas():
    with pytest.raises(ValueError, match="increasing"):
        MaxBoxAccumulator([0.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaxBoxAccumulator([0.0, 1.5])
    with pytest.raises(ValueError, match="iou_deltas"):
        MaxBoxAccumulator(THR_01, iou_deltas=(30, 30))
    with pytest.raises(ValueError, match="below 1"):
        PxAPAccumulator([0.0, 1.0])


@pytest.mark.parametrize("interval", [0.001, 0.01, 0.003])
def test_pxap_bins_of_the_device_path_are_np_histograms(interval):
    """The GPU path's bin rule (``floor(s / step)`` settled by one comparison each way) gives
    np.histogram's bins, also for scores exactly on, or one ulp below, an edge."""
    acc = PxAPAccumulator(np.arange(0, 1, interval))
    edges = acc._edges
    below = torch.nextafter(edges[:-2], torch.tensor(-1.0, dtype=torch.float64)).clamp(0)
    scores = torch.cat(
        [
            torch.rand(50_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
            edges[:-2],
            below,
            torch.tensor([0.0, 1.0]),
        ]
    )
    for x in (scores, scores.float().double()):
        np.testing.assert_array_equal(
            acc._bins(x).numpy(),
            np.clip(np.searchsorted(edges.numpy(), x.numpy(), side="right") - 1, 0, acc.num_bins - 1),
        )
