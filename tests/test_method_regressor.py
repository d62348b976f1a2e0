"""The box regressor (wsol_core/methods/regressor.py, PSOL's design) and what it learns from: crop
windows reported by the loader (Batch.views), pseudo boxes from a sidecar (Batch.pseudo_boxes,
never the GT boxes), its loss, its drawn maps and its pre-flight checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_extract_boxes import SOURCE, BrightnessOracle, rectangle_split

from wsol_core.config import ConfigError, load_config
from wsol_core.data.batch import Batch, boxes_in_view
from wsol_core.data.loader import build_loader
from wsol_core.data.pseudo_boxes import new_header, write_header
from wsol_core.extraction import extract_shards
from wsol_core.methods import build_method
from wsol_core.methods.regressor import draw_boxes, xywh_to_corners
from wsol_core.metrics import prepare_maps
from wsol_core.metrics.reference import reference_boxes, reference_iou


def test_boxes_are_carried_into_the_crop_and_mirrored_with_it():
    boxes = torch.tensor([[10.0, 20.0, 49.0, 59.0]] * 4)  # inclusive: covers [10, 50) x [20, 60)
    views = torch.tensor(
        [
            [0.0, 0.0, 100.0, 100.0, 0.0],  # the whole picture
            [0.0, 0.0, 100.0, 100.0, 1.0],  # mirrored
            [30.0, 40.0, 70.0, 80.0, 0.0],  # a crop holding part of the box
            [60.0, 60.0, 100.0, 100.0, 0.0],  # a crop that misses it
        ]
    )
    inside, visible = boxes_in_view(boxes, views)
    torch.testing.assert_close(inside[0], torch.tensor([0.1, 0.2, 0.5, 0.6]))
    torch.testing.assert_close(inside[1], torch.tensor([0.5, 0.2, 0.9, 0.6]))
    torch.testing.assert_close(inside[2], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert visible.tolist() == [True, True, True, False]


@pytest.mark.parametrize(
    "backend, decode, rrc",
    [
        ("torch", "workers", True),
        ("torch", "device", True),
        ("torch", "workers", False),
        ("dali", "workers", True),
        ("dali", "workers", False),
    ],
)
def test_every_loaders_views_put_the_box_on_the_object_in_augmented_images(tmp_path, backend, decode, rrc):
    """Pictures of one white rectangle: through each random crop (random-resized, or resize and
    crop), resize and flip, the GT box carried by ``Batch.views`` must land on the white pixels of
    the augmented image, for the torch loader (both decode modes) and DALI (CPU)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    rectangle_split(tmp_path / "train", n=12)
    loader = build_loader(
        tmp_path / "train",
        split_kind="train",
        backend=backend,
        decode=decode,
        num_threads=0 if backend == "torch" else 1,
        batch_size=6,
        crop_size=64,
        resize_size=80,
        random_resized_crop=rrc,
        rrc_scale=(0.3, 1.0),
        seed=3,
    )
    assert loader.backend == backend
    checked = flipped = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.views is not None and batch.views.shape == (6, 5)
            inside, visible = boxes_in_view(batch.boxes[:, 0], batch.views)
            bright = batch.images.mean(1) > 0.5  # white in normalized units; black is about -1.8
            for i in range(len(batch)):
                if not visible[i] or bright[i].sum() < 20:
                    continue  # the crop (nearly) misses the object
                ys, xs = bright[i].nonzero(as_tuple=True)
                seen = np.array([[xs.min(), ys.min(), xs.max(), ys.max()]], dtype=np.int64)
                expected = (inside[i] * 64).round().numpy().astype(np.int64)
                expected[2:] -= 1  # fractions of the width -> inclusive pixel corners
                assert reference_iou(seen, expected[None])[0, 0] > 0.8, (batch.keys[i], seen, expected)
                checked += 1
                flipped += int(batch.views[i, 4])
    assert checked >= 15 and 0 < flipped < checked  # both orientations were checked


def test_drawn_boxes_are_what_the_protocol_finds_at_every_threshold():
    corners = torch.tensor([[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0]])
    maps = draw_boxes(corners, 224, 224)
    quantized = prepare_maps(maps).numpy()
    for threshold in (0.05, 0.5, 0.95):
        assert reference_boxes(quantized[0], threshold).tolist() == [[56, 112, 168, 223]]
        # The whole picture: drawn one column short (a constant map is zeroed by min-max), and
        # the protocol clips the far corner to W - 1, so the box found is the whole picture.
        assert reference_boxes(quantized[1], threshold).tolist() == [[0, 0, 223, 223]]
    torch.testing.assert_close(
        xywh_to_corners(torch.tensor([[0.1, 0.2, 0.3, 0.4]])), torch.tensor([[0.1, 0.2, 0.4, 0.6]])
    )


def _regressor(**overrides: str):
    settings = [f"method.{k}={v}" for k, v in overrides.items()]
    cfg = load_config(overrides=["method.name=regressor", "model.backbone=tiny", *settings])
    return build_method(cfg, 3)


def _batch(pseudo: list[float], gt: list[float], views: list[float] | None = None) -> Batch:
    return Batch(
        images=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        labels=torch.tensor([0, 1]),
        keys=["a", "b"],
        orig_sizes=torch.tensor([[100, 100], [100, 100]]),
        boxes=torch.tensor([[gt], [gt]]),
        num_boxes=torch.ones(2, dtype=torch.int64),
        views=torch.tensor([views or [0.0, 0.0, 100.0, 100.0, 0.0]] * 2),
        pseudo_boxes=torch.tensor([pseudo, pseudo]),
    )


def test_the_loss_is_lambda_times_the_mse_to_the_pseudo_box_in_xywh():
    method = _regressor()
    batch = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    exact = {"box": torch.tensor([[0.1, 0.2, 0.4, 0.4]] * 2, requires_grad=True)}
    assert method.losses(exact, batch)["box"].item() == pytest.approx(0.0, abs=1e-10)
    off = {"box": torch.tensor([[0.2, 0.2, 0.4, 0.4]] * 2)}
    assert method.losses(off, batch)["box"].item() == pytest.approx(50.0 * 0.01 / 4)  # lambda_reg = 50
    # Fed from the pseudo boxes, never the GT: moving the GT changes nothing, moving the pseudo box does.
    moved_gt = _batch([10.0, 20.0, 49.0, 59.0], gt=[10.0, 20.0, 49.0, 59.0])
    assert method.losses(off, moved_gt)["box"].item() == pytest.approx(50.0 * 0.01 / 4)
    moved_pseudo = _batch([20.0, 20.0, 59.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    assert method.losses(off, moved_pseudo)["box"].item() == pytest.approx(0.0, abs=1e-10)
    smooth = _regressor(loss="smooth_l1")
    assert smooth.losses(off, batch)["box"].item() == pytest.approx(50.0 * 0.5 * 0.01 / 4)


def test_a_crop_that_misses_its_box_is_left_out_and_the_share_is_logged():
    method = _regressor()
    missed = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0], views=[60.0, 60.0, 100.0, 100.0, 0.0])
    outputs = {"box": torch.tensor([[0.2, 0.2, 0.4, 0.4]] * 2)}
    assert method.losses(outputs, missed)["box"].item() == 0.0
    assert method.diagnostics(outputs)["target_visible"].item() == 0.0
    half = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    half.views[1] = torch.tensor([60.0, 60.0, 100.0, 100.0, 0.0])
    assert method.losses(outputs, half)["box"].item() == pytest.approx(50.0 * 0.01 / 4)  # sample 0 only
    assert method.diagnostics(outputs)["target_visible"].item() == 0.5


def test_the_loss_trains_the_head_and_the_backbone_and_names_missing_inputs():
    method = _regressor().train()
    batch = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    outputs = method(batch.images)
    method.losses(outputs, batch)["box"].backward()
    assert method.box_head.mlp[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    masks = method.loss_masks(outputs)
    assert masks["box"].shape == (2, 64, 64) and 0 < masks["box"].mean() < 1
    no_pseudo = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    no_pseudo.pseudo_boxes = None
    with pytest.raises(ValueError, match="set data.pseudo_boxes"):
        method.losses(outputs, no_pseudo)
    no_views = _batch([10.0, 20.0, 49.0, 59.0], gt=[0.0, 0.0, 99.0, 99.0])
    no_views.views = None
    with pytest.raises(
        ValueError, match=r"needs each crop's window \(Batch.views\): this batch's loader reported none"
    ):
        method.losses(outputs, no_views)


def test_trained_on_a_sidecar_it_learns_the_boxes(tmp_path):
    """Oracle pseudo boxes of rectangle pictures, the torch loader's crops and flips: the box loss
    falls by more than half in 60 steps of the tiny backbone."""
    rectangle_split(tmp_path / "train", n=16)
    sidecar = tmp_path / "train.pseudo_boxes"
    write_header(sidecar, new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    extract_shards(
        BrightnessOracle(),
        tmp_path / "train",
        sidecar,
        threshold=0.5,
        device=torch.device("cpu"),
        options=build_loader(tmp_path / "train", split_kind="eval", backend="torch", num_threads=0).options,
        progress=False,
    )
    loader = build_loader(
        tmp_path / "train",
        split_kind="train",
        backend="torch",
        num_threads=0,
        batch_size=8,
        crop_size=64,
        resize_size=72,
        pseudo_boxes=str(sidecar),
    )
    torch.manual_seed(0)
    method = _regressor().train()
    optimizer = torch.optim.Adam(method.parameters(), lr=3e-3)
    losses = []
    for epoch in range(30):
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.pseudo_boxes is not None and batch.pseudo_boxes.shape == (8, 4)
            loss = method.losses(method(batch.images), batch)["box"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_preflight_wants_a_sidecar_that_matches_the_training_split(tmp_path):
    from wsol_core.train.preflight import check_pseudo_boxes

    rectangle_split(tmp_path / "train", n=4)
    cfg = load_config(overrides=["method.name=regressor", "model.backbone=tiny"])
    with pytest.raises(ConfigError, match="method.name = 'regressor' learns from pseudo boxes: set data.pseudo_boxes"):
        check_pseudo_boxes(cfg, tmp_path)
    write_header(tmp_path / "train.pseudo_boxes", new_header(tmp_path / "train", "fixed", 0.5, SOURCE))
    relative = load_config(
        overrides=["method.name=regressor", "model.backbone=tiny", "data.pseudo_boxes=train.pseudo_boxes"]
    )
    with pytest.raises(ConfigError, match=r"data.pseudo_boxes = 'train.pseudo_boxes': .* 0 boxes and 0 skipped"):
        check_pseudo_boxes(relative, tmp_path)
    loader = build_loader(tmp_path / "train", split_kind="eval", backend="torch", num_threads=0)
    extract_shards(
        BrightnessOracle(), tmp_path / "train", tmp_path / "train.pseudo_boxes", threshold=0.5,
        device=torch.device("cpu"), options=loader.options, progress=False,
    )  # fmt: skip
    check_pseudo_boxes(relative, tmp_path)  # now complete: accepted
    check_pseudo_boxes(load_config(overrides=["method.name=cam"]), tmp_path)  # no sidecar needed


def test_its_search_space_loads_and_names_its_field():
    from wsol_core.experiments.space import PARAMETERS, load_space

    space = load_space("regressor")
    assert list(space.params) == ["lambda_reg"] and PARAMETERS["lambda_reg"] == {"regressor": "method.loss_weight"}


def test_the_grid_head_keeps_the_maps_layout():
    """``pool=grid`` (PSOL's VGG16 reading): a feature map that moves moves the box; global
    pooling cannot tell the two maps apart."""
    grid, gap = _regressor(pool="grid"), _regressor()
    assert grid.box_head.mlp[0].in_features == grid.backbone.out_channels * 49
    assert gap.box_head.mlp[0].in_features == gap.backbone.out_channels
    left, right = torch.zeros(1, grid.backbone.out_channels, 14, 14), torch.zeros(1, grid.backbone.out_channels, 14, 14)
    left[..., :, :4], right[..., :, -4:] = 1.0, 1.0
    assert not torch.allclose(grid.box_head(left), grid.box_head(right))
    torch.testing.assert_close(gap.box_head(left), gap.box_head(right))
