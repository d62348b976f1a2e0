"""The boxes drawn on the CAM pictures (``wsol_core.viz.component_boxes``) against a plain
breadth-first labelling written here, on shaped and on random maps."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from wsol_core.viz import component_boxes


def boxes_by_flood_fill(score_map: np.ndarray, threshold: float) -> set[tuple[int, int, int, int]]:
    """Each 8-connected component of ``map > int(threshold * max)``, walked pixel by pixel."""
    foreground = score_map.astype(np.int64) > int(threshold * int(score_map.max()))
    height, width = foreground.shape
    seen = np.zeros_like(foreground)
    boxes = set()
    for start in zip(*np.nonzero(foreground)):
        if seen[start]:
            continue
        seen[start] = True
        queue, ys, xs = deque([start]), [], []
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        boxes.add((min(xs), min(ys), max(xs), max(ys)))
    return boxes or {(0, 0, 0, 0)}


def as_set(boxes: np.ndarray) -> set[tuple[int, int, int, int]]:
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4
    return {tuple(int(v) for v in row) for row in boxes}


def test_shapes_touching_corners_holes_and_the_strict_cut():
    score_map = np.zeros((20, 30), np.uint8)
    score_map[2:6, 3:9] = 200  # a block
    score_map[6, 9] = 180  # touches the block's corner only: 8-connected, one component
    score_map[10:18, 12:22] = 250  # a ring: its hole does not split it
    score_map[12:16, 15:19] = 0
    score_map[1, 28] = 100  # exactly at the cut (int(0.4 * 250) = 100): background
    score_map[18, 28] = 101  # just above it: a one-pixel component
    expected = {(3, 2, 9, 6), (12, 10, 21, 17), (28, 18, 28, 18)}
    assert boxes_by_flood_fill(score_map, 0.4) == expected
    assert as_set(component_boxes(score_map, 0.4)) == expected
    assert as_set(component_boxes(torch.from_numpy(score_map), 0.4)) == expected  # a tensor as well


def test_an_empty_foreground_gives_the_protocols_zero_box():
    assert as_set(component_boxes(np.zeros((8, 8), np.uint8), 0.5)) == {(0, 0, 0, 0)}
    flat = np.full((8, 8), 90, np.uint8)  # everything at the cut: nothing above it
    assert as_set(component_boxes(flat, 1.0)) == {(0, 0, 0, 0)}


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_the_flood_fill(seed):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
    score_map = rng.integers(0, 256, size=size).astype(np.uint8)
    for threshold in (0.0, 0.3, 0.6, 0.9):
        assert as_set(component_boxes(score_map, threshold)) == boxes_by_flood_fill(score_map, threshold)
