"""Pictures for MLflow: CAM overlays with boxes (as in the papers' figures) and threshold curves.

GT boxes are drawn in red and predicted boxes in green, the convention of FMCG's Figure 1 and
most WSOL papers. Everything is drawn in the protocol's 224x224 frame.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: torch.Tensor, size: int = 224) -> np.ndarray:
    """Normalized ``[N, 3, H, W]`` -> uint8 ``[N, size, size, 3]`` for drawing."""
    images = F.interpolate(images.float().cpu(), size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def component_boxes(map_uint8: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    """Boxes ``(x0, y0, x1, y1)`` of the 8-connected foreground components at one CAM threshold,
    for pictures: ``int64 [k, 4]``, ``k >= 1``.

    Foreground follows the protocol (value > ``int(threshold * max)``), and an empty foreground
    gives the protocol's ``(0, 0, 0, 0)`` box. The evaluator counts hole contours too
    (:func:`wsol_core.metrics.reference.reference_boxes`); a picture only needs the outer boxes.
    OpenCV labels the components in one pass (``cv2.connectedComponentsWithStats``), which matters
    here because every validation of a run draws pictures: on a noisy 224x224 map the earlier
    max-pool label propagation took 0.3 s of CPU per picture.
    """
    import cv2  # the evaluator's dependency; imported where a picture is drawn

    scores = np.asarray(map_uint8.cpu() if isinstance(map_uint8, torch.Tensor) else map_uint8).astype(np.int64)
    foreground = (scores > int(threshold * int(scores.max()))).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    if count == 1:  # label 0 is the background: no component
        return np.zeros((1, 4), dtype=np.int64)
    x, y = stats[1:, cv2.CC_STAT_LEFT], stats[1:, cv2.CC_STAT_TOP]
    width, height = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    return np.stack([x, y, x + width - 1, y + height - 1], axis=1).astype(np.int64)


def _draw_boxes(ax, boxes, color: str) -> None:
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        ax.add_patch(Rectangle((x0, y0), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor=color, linewidth=2))


def cam_overlay_grid(
    images: np.ndarray,
    maps: np.ndarray,
    gt_boxes: list[np.ndarray],
    pred_boxes: list[np.ndarray],
    titles: list[str] | None = None,
    columns: int = 4,
) -> Figure:
    """A grid of images with their localization maps overlaid (jet, alpha 0.5), GT boxes red,
    predicted boxes green. ``images`` uint8 ``[N, 224, 224, 3]``, ``maps`` ``[N, 224, 224]``."""
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        ax.imshow(images[index])
        ax.imshow(maps[index], cmap="jet", alpha=0.5, vmin=0, vmax=max(float(np.max(maps[index])), 1e-6))
        _draw_boxes(ax, gt_boxes[index], "red")
        _draw_boxes(ax, pred_boxes[index], "lime")
        if titles:
            ax.set_title(titles[index], fontsize=8)
    figure.tight_layout()
    return figure


def box_comparison_grid(
    images: np.ndarray,
    gt_boxes: list[np.ndarray],
    boxes: dict[str, list[np.ndarray]],
    titles: list[str] | None = None,
    columns: int = 4,
) -> Figure:
    """Images with their GT boxes (red) and one box per named model, each in its own colour
    (listed in the figure's legend): the first stage's map box beside the regressor's box.
    ``images`` uint8 ``[N, 224, 224, 3]``; boxes in the 224 frame, inclusive corners."""
    palette = ("lime", "cyan", "yellow", "magenta")
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows + 0.4), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= count:
            continue
        ax.imshow(images[index])
        _draw_boxes(ax, gt_boxes[index], "red")
        for color, per_image in zip(palette, boxes.values()):
            _draw_boxes(ax, per_image[index], color)
        if titles:
            ax.set_title(titles[index], fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor=c, linewidth=2) for c in ("red", *palette)]
    figure.legend(handles[: len(boxes) + 1], ["GT", *boxes], loc="lower center", ncol=len(boxes) + 1)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    return figure


def threshold_curves(
    thresholds: np.ndarray, curves: dict[int, np.ndarray], best: dict[int, float] | None = None
) -> Figure:
    """Box accuracy (%) against the CAM threshold, one line per IoU criterion."""
    figure, ax = plt.subplots(figsize=(6, 4))
    for delta, accuracy in sorted(curves.items()):
        (line,) = ax.plot(thresholds, accuracy, label=f"IoU >= {delta / 100:.1f}")
        if best and delta in best:
            ax.axvline(best[delta], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("CAM threshold")
    ax.set_ylabel("box accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    return figure


def pr_curve(result) -> Figure:
    """The pixel precision-recall curve behind PxAP (a :class:`~wsol_core.metrics.PxAPResult`)."""
    figure, ax = plt.subplots(figsize=(5, 4))
    defined = ~np.isnan(result.precision)
    ax.plot(result.recall[defined], result.precision[defined], drawstyle="steps-post")
    ax.set_xlabel("pixel recall")
    ax.set_ylabel("pixel precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"PxAP {result.pxap:.2f}")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure
