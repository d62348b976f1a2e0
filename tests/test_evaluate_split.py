"""What evaluate_split reports: the published definitions on maps built to tell them apart.

A scripted method returns the maps written into its input images (channel 0) and class scores
(channel 1, first row), on the protocol's 224 grid with 224x224 originals so boxes need no
rescaling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsol_core.config import EvalConfig, load_config
from wsol_core.data.batch import Batch
from wsol_core.methods.base import Inference, WSOLMethod
from wsol_core.metrics.reference import reference_normalize, reference_pxap
from wsol_core.train.evaluate import eval_autocast, evaluate_split

NUM_CLASSES = 4


class ScriptedMethod(torch.nn.Module):
    uses_labels = True
    loss_masks = WSOLMethod.loss_masks

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def inference(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Inference:
        return Inference(logits=images[:, 1, 0, :NUM_CLASSES].clone(), maps=images[:, 0].clone())

    def inference_variants(self, images, labels=None) -> dict:
        return {}


def batch(
    maps: list[np.ndarray], boxes: list[list[int]] | None, labels: list[int], predicted: list[int], masks=None
) -> Batch:
    n = len(maps)
    images = torch.zeros(n, 3, 224, 224)
    images[:, 0] = torch.from_numpy(np.stack(maps)).float()
    for i, cls in enumerate(predicted):
        images[i, 1, 0, cls] = 1.0
    box_tensor = torch.tensor([[b] for b in boxes], dtype=torch.float32) if boxes else torch.full((n, 1, 4), -1.0)
    return Batch(
        images=images,
        labels=torch.tensor(labels),
        keys=[f"k{i}" for i in range(n)],
        orig_sizes=torch.full((n, 2), 224),
        boxes=box_tensor,
        num_boxes=torch.ones(n, dtype=torch.int64) if boxes else torch.zeros(n, dtype=torch.int64),
        masks=None if masks is None else torch.from_numpy(np.stack(masks)),
    )


def two_blobs() -> np.ndarray:
    """A large blob (left) and a smaller one (right) of the same score."""
    m = np.zeros((224, 224), np.float32)
    m[20:100, 10:90] = 1.0  # 80 x 80
    m[120:170, 150:200] = 1.0  # 50 x 50
    return m


CFG = EvalConfig(compare_inference_maps=False, mask_stat_images=0, num_vis_images=0)


def test_loc_is_one_box_per_image_the_largest_contour():
    """GT is the small blob: every-contour V2 finds it, the published single box does not."""
    b = batch([two_blobs()], [[150, 120, 199, 169]], labels=[2], predicted=[2])
    metrics = evaluate_split(ScriptedMethod(), [b], CFG, split="val").metrics
    assert metrics["val/boxacc_v2_iou50"] == 100.0 and metrics["val/boxacc_v2_iou70"] == 100.0
    assert metrics["val/maxboxacc_v1"] == 0.0
    assert metrics["val/gt_known_loc"] == 0.0 and metrics["val/top1_loc"] == 0.0
    # ... and with the GT on the large blob, the single box is right and Top-1 needs the class.
    right = batch([two_blobs(), two_blobs()], [[10, 20, 89, 99]] * 2, labels=[2, 2], predicted=[2, 1])
    metrics = evaluate_split(ScriptedMethod(), [right], CFG, split="val").metrics
    assert metrics["val/maxboxacc_v1"] == 100.0 and metrics["val/gt_known_loc"] == 100.0
    assert metrics["val/top1_loc"] == 50.0 and metrics["val/top5_loc"] == 100.0


def gradient_blob() -> np.ndarray:
    """A cone: the box shrinks as the threshold rises; the GT is the whole cone."""
    ys, xs = np.mgrid[0:224, 0:224]
    return np.clip(1.0 - np.hypot(xs - 112, ys - 112) / 60.0, 0, None).astype(np.float32)


def test_loc_is_read_at_the_threshold_given_by_val():
    b = batch([gradient_blob()] * 2, [[53, 53, 171, 171]] * 2, labels=[0, 0], predicted=[0, 0])
    own = evaluate_split(ScriptedMethod(), [b], CFG, split="test")
    assert own.metrics["test/gt_known_loc"] == 100.0
    assert own.loc_threshold_index == own.accuracy_v1.best_threshold_index[50]
    high = 900  # threshold 0.9: a small box around the peak
    given = evaluate_split(ScriptedMethod(), [b], CFG, split="test", loc_threshold_index=high)
    assert given.metrics["test/loc_threshold"] == pytest.approx(0.9)
    assert given.metrics["test/gt_known_loc"] == 0.0 and given.metrics["test/top1_loc"] == 0.0
    # MaxBoxAcc itself still takes its own best threshold: only Loc follows val's choice.
    assert given.metrics["test/maxboxacc_v1"] == own.metrics["test/maxboxacc_v1"] == 100.0


def test_pxap_on_a_split_with_masks_and_no_boxes():
    rng = np.random.default_rng(0)
    maps = [rng.random((224, 224)).astype(np.float32) for _ in range(3)]
    masks = []
    for m in maps:
        mask = (m + 0.3 * rng.random(m.shape) > 0.7).astype(np.uint8)  # high scores are mostly foreground
        mask[:10] = 255
        masks.append(mask)
    outcome = evaluate_split(
        ScriptedMethod(), [batch(maps, None, [0, 1, 2], [0, 1, 2], masks)], CFG, split="test", draw=True
    )
    want = reference_pxap([reference_normalize(m) for m in maps], masks, np.arange(0, 1, 0.001))
    assert 50.0 < want < 99.0
    assert outcome.metrics["test/pxap"] == pytest.approx(want, abs=1e-6)
    assert not any("boxacc" in k or "loc" in k for k in outcome.metrics)
    assert outcome.pr_curve is not None and outcome.accuracy is None


def test_a_split_mixing_boxed_and_unboxed_images_is_an_error():
    boxed = batch([gradient_blob()], [[53, 53, 171, 171]], [0], [0])
    unboxed = batch([gradient_blob()], None, [0], [0])
    with pytest.raises(ValueError, match="1 of 2 images have no GT box"):
        evaluate_split(ScriptedMethod(), [boxed, unboxed], CFG, split="val")


def test_evaluation_is_fp32_unless_asked():
    cfg = load_config()
    assert cfg.eval.precision == "fp32" and cfg.eval.loader == "exact"
    with eval_autocast(cfg.eval.precision, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with eval_autocast("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")


def test_evaluation_reads_the_exact_input_path_by_default():
    from wsol_core.train.loop import eval_loader_options, loader_options

    cfg = load_config(overrides=["data.loader=dali"])
    assert loader_options(cfg).backend == "dali" and eval_loader_options(cfg).backend == "torch"
    same = load_config(overrides=["data.loader=dali", "eval.loader=same"])
    assert eval_loader_options(same).backend == "dali"
