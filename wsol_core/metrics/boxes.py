"""All-thresholds box extraction: every threshold of a score map in one pass over its pixels.

The protocol (Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right",
CVPR 2020) turns a uint8 score map into boxes once per threshold ``t``::

    cut        = int(t * max(map))                      # 0..255
    foreground = map > cut                              # cv2.threshold(..., THRESH_BINARY)
    contours   = cv2.findContours(fg, RETR_TREE, CHAIN_APPROX_SIMPLE)
    box        = (x, y, min(x + w, W - 1), min(y + h, H - 1))   # per cv2.boundingRect(contour)

and scores the threshold by the best IoU (inclusive corners) over all boxes x all GT boxes. The
binary image depends on ``t`` only through ``cut``, so a map has at most 256 distinct binary images
however many thresholds are asked for. This module computes, for every cut level at once, the best
IoU and the number of boxes, from two union-find sweeps over the pixels sorted by value.

Why the sweeps give exactly OpenCV's boxes
-------------------------------------------
``findContours`` (Suzuki & Abe's border following, on the image padded with a one-pixel zero frame)
treats the foreground as 8-connected and the background as 4-connected. With ``RETR_TREE`` it
returns one contour per

* **outer border**: one per 8-connected foreground component. The border passes through the
  component's extreme pixels, so its bounding rectangle is the component's bounding box
  ``(xmin, ymin, xmax - xmin + 1, ymax - ymin + 1)``. ``CHAIN_APPROX_SIMPLE`` only drops points
  in the middle of straight runs, never an extreme one.
* **hole border**: one per 4-connected background component that does not reach the frame (a pixel
  on the image edge is 4-adjacent to the zero frame). The hole border runs through the foreground
  pixels 4-adjacent to the hole; the leftmost hole pixel has a foreground pixel on its left, and no
  foreground pixel two columns out is 4-adjacent to the hole, so the rectangle is the hole's
  bounding box grown by one pixel on every side.

Both claims are checked against ``cv2.findContours`` in ``tests/test_metrics_properties.py``
(rings, nested rings, checkerboards, speckle, diagonals, border-touching regions) and on the
public vectors made with the reference evaluator, box counts included.

The sweeps
----------
* Foreground, high to low: pixels are added in decreasing value order (counting sort; equal values
  in raster order); after all pixels of value ``v`` are in, the union-find holds the 8-connected
  components of the foreground at cut ``v - 1``. Each root carries its bounding box and the cut
  level at which that box appeared. When a component's box changes (a pixel or a merge grows it) or
  the component is merged away, the old box is *closed*: it existed, unchanged, on a contiguous
  range of cut levels, and its best IoU against the GT boxes is folded into a range-max over those
  levels.
* Background, low to high: the same with 4-connectivity and a virtual frame node joined by every
  edge pixel, so the components not joined to the frame are exactly the holes at each cut.

Which neighbours are already in is known from the values alone (higher value, or equal value and
earlier in raster order), so a vectorized raster pass builds an 8-bit mask of them per pixel, and
the counting sort packs it with the coordinates into one sequential stream. Added neighbours that
touch each other are already in one set, so a 256-entry table gives one representative per group
of touching neighbours: a pixel inside a region needs one ``find`` instead of up to eight, and is
attached straight to that root. The sweeps are bound by memory latency (the order is random), and
these are what keeps them at a few nanoseconds per pixel.

A 256-leaf segment tree does the range-max in ``O(log 256)`` per closed box; there are at most as
many closed boxes as union-find events, so a map costs ``O(H W alpha)`` work, independent of the
number of thresholds. Levels with no contour score the protocol's ``(0, 0, 0, 0)`` box.

Largest-contour mode (MaxBoxAcc v1)
-----------------------------------
The v1 protocol keeps only ``max(contours, key=cv2.contourArea)``. A hole's polygon lies inside its
parent's outer polygon and the parent comes first in OpenCV's list, so the winner is always an outer
border. Its area is the shoelace area of the border traced the way Suzuki & Abe trace it; the sweep
retraces a component whenever it changes (cost: its perimeter) and keeps, per level, the component
with the largest area. Ties go to the component whose first pixel in raster order comes last,
OpenCV's order for sibling contours (it lists them in reverse discovery order); ties between
contours at different nesting depths may be ordered differently by OpenCV (documented deviation).

The numba kernels take a whole batch and run images in parallel (``prange``); everything around them
(validation, cut levels, counting) is plain numpy/torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import njit, prange

from wsol_core.metrics.validation import as_uint8_maps, check_thresholds, flatten_gt_boxes

__all__ = [
    "NUM_LEVELS",
    "LevelScores",
    "best_iou_per_level",
    "best_iou_per_threshold",
    "cut_level_table",
]

NUM_LEVELS = 256
"""Number of distinct cut levels ``int(t * max)`` of a uint8 map (0..255)."""

# Rows of the per-chunk `box` array (one column per union-find node): a root's bounding box and
# the cut level at which that box appeared.
_X0, _Y0, _X1, _Y1, _START = range(5)
_BOX_ROWS = 5

_NO_RECORD = -1  # largest-contour sweep: a root without an open record

_MIN_MAPS_PER_THREAD = 4  # smaller batches run on fewer threads

# The 8-neighbourhood ring, counter-clockwise on screen (y grows downwards), starting east:
# E, NE, N, NW, W, SW, S, SE. Ring positions 1-4 come before the pixel in raster order.
_DX8 = (1, 1, 0, -1, -1, -1, 0, 1)
_DY8 = (0, -1, -1, -1, 0, 1, 1, 1)


# Preferred representative of a group: the west neighbour first (with the same value it was added
# just before this pixel, so its union-find entry is still in cache), then the row above.
_REPRESENTATIVE_PRIORITY = (4, 3, 2, 1, 0, 5, 6, 7)


def _neighbour_group_tables() -> tuple[np.ndarray, np.ndarray]:
    """Representatives of the groups of touching neighbours, for every 8-bit neighbour mask.

    Row ``m`` of each ``int8 [256, 5]`` table is ``count, d1, d2, d3, d4``: ring directions to
    union with when the neighbours in mask ``m`` are already in.

    * 8-connectivity (foreground): any two ring-consecutive neighbours touch, and so do two
      4-neighbours a quarter turn apart (e.g. N and E are diagonal to each other).
    * 4-connectivity (background): only 4-neighbours join the pixel; two of them a quarter turn apart
      are in one set when the corner pixel between them is in too.
    """
    eight = np.zeros((256, 5), np.int8)
    four = np.zeros((256, 5), np.int8)
    quarter_turns = [(d, (d + 2) % 8) for d in (0, 2, 4, 6)]
    for mask in range(256):
        present = [bool(mask >> d & 1) for d in range(8)]
        for table, nodes, links in (
            (eight, range(8), [(d, (d + 1) % 8) for d in range(8)] + quarter_turns),
            (four, (0, 2, 4, 6), quarter_turns),
        ):
            label = {d: d for d in nodes if present[d]}

            def root(d: int, label: dict[int, int] = label) -> int:
                while label[d] != d:
                    d = label[d]
                return d

            for a, b in links:
                # 4-connected: a and b (a quarter turn apart) meet through the corner between them.
                if a in label and b in label and (table is eight or present[(a + 1) % 8]):
                    label[root(a)] = root(b)
            representative: dict[int, int] = {}
            for d in _REPRESENTATIVE_PRIORITY:
                if d in label:
                    representative.setdefault(root(d), d)
            reps = list(representative.values())
            table[mask, 0] = len(reps)
            table[mask, 1 : 1 + len(reps)] = reps
    return eight, four


_GROUPS8, _GROUPS4 = _neighbour_group_tables()


# --------------------------------------------------------------------------------------------
# Small numba helpers
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _find(parent, i):
    # Path halving (each visited node skips to its grandparent), without the store when the
    # parent already is the root: the common case here, as pixels attach straight to roots.
    p = parent[i]
    while p != i:
        grandparent = parent[p]
        if grandparent == p:
            return p
        parent[i] = grandparent
        i = grandparent
        p = parent[i]
    return i


@njit(cache=True)
def _best_gt_iou(x0, y0, x1, y1, gt, g0, g1):
    """Best IoU of box ``(x0, y0, x1, y1)`` against ``gt[g0:g1]``, inclusive corners.

    Integer areas and one float64 division, as the protocol's numpy code does, so the value is
    bit-identical to it.
    """
    best = 0.0
    area_a = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(g0, g1):
        ix0 = max(x0, gt[g, 0])
        iy0 = max(y0, gt[g, 1])
        ix1 = min(x1, gt[g, 2])
        iy1 = min(y1, gt[g, 3])
        if ix1 < ix0 or iy1 < iy0:
            inter = 0
        else:
            inter = (ix1 - ix0 + 1) * (iy1 - iy0 + 1)
        area_b = (gt[g, 2] - gt[g, 0] + 1) * (gt[g, 3] - gt[g, 1] + 1)
        iou = inter / (area_a + area_b - inter)
        if iou > best:
            best = iou
    return best


@njit(cache=True)
def _range_max(tree, lo, hi, key, payload, values):
    """Segment tree update: leaves ``lo..hi`` (inclusive) take ``max(leaf, key)``.

    ``values`` (may be ``tree`` itself) carries a payload along with the winning key; the point
    query returns the payload of the largest key on the leaf-to-root path.
    """
    left = lo + NUM_LEVELS
    right = hi + NUM_LEVELS + 1
    while left < right:
        if left & 1:
            if tree[left] < key:
                tree[left] = key
                values[left] = payload
            left += 1
        if right & 1:
            right -= 1
            if tree[right] < key:
                tree[right] = key
                values[right] = payload
        left >>= 1
        right >>= 1


@njit(cache=True)
def _point_query(tree, values, level):
    node = level + NUM_LEVELS
    best = tree[node]
    payload = values[node]
    node >>= 1
    while node >= 1:
        if tree[node] > best:
            best = tree[node]
            payload = values[node]
        node >>= 1
    return payload


# Layout of a sorted-pixel entry (int64): foreground mask, background mask, y, x, linear index
# (sides below 4096, see validation.MAX_MAP_SIDE).
_FG_SHIFT = 56
_BG_SHIFT = 48
_Y_SHIFT = 36
_X_SHIFT = 24
_COORD = (1 << 12) - 1
_INDEX = (1 << 24) - 1


@njit(cache=True)
def _sort_pixels(img, masks, order, starts):
    """Pixels sorted by value (counting sort), ties in raster order.

    The pixels of value ``v`` are ``order[starts[v]:starts[v+1]]``. Each entry packs the pixel's
    coordinates with its two neighbour masks, so a sweep reads everything about the pixel from one
    sequential stream instead of a random access per pixel (the sweeps are memory-latency bound).
    """
    H, W = img.shape
    starts[:] = 0
    for y in range(H):
        for x in range(W):
            starts[img[y, x] + 1] += 1
    for v in range(NUM_LEVELS):
        starts[v + 1] += starts[v]
    fill = starts[:NUM_LEVELS].copy()
    for y in range(H):
        for x in range(W):
            v = img[y, x]
            order[fill[v]] = (
                (np.int64(masks[0, y, x]) << _FG_SHIFT)
                | (np.int64(masks[1, y, x]) << _BG_SHIFT)
                | (np.int64(y) << _Y_SHIFT)
                | (np.int64(x) << _X_SHIFT)
                | (y * W + x)
            )
            fill[v] += 1


@njit(cache=True)
def _edge_neighbour_mask(flat, x, y, W, H, descending):
    """:func:`_neighbour_masks` for a pixel on the image edge; outside neighbours are never in."""
    v = flat[y * W + x]
    mask = 0
    for d in range(8):
        xx = x + _DX8[d]
        yy = y + _DY8[d]
        if 0 <= xx < W and 0 <= yy < H:
            u = flat[yy * W + xx]
            earlier = 1 <= d <= 4
            if descending:
                added = u > v or (earlier and u == v)
            else:
                added = u < v or (earlier and u == v)
            if added:
                mask |= 1 << d
    return mask


@njit(cache=True)
def _neighbour_masks(img, fg_masks, bg_masks):
    """Per pixel, bit ``d`` set when ring neighbour ``d`` is added before the pixel.

    Foreground sweep (descending values): neighbours with a higher value, or an equal value and
    earlier in raster order (ring positions 1-4). Background sweep (ascending): the mirror image.
    A raster pass over row views that the compiler vectorizes; the sweeps then read one byte per
    pixel instead of eight scattered neighbours.
    """
    H, W = img.shape
    for y in range(1, H - 1):
        up = img[y - 1]
        mid = img[y]
        down = img[y + 1]
        fg_row = fg_masks[y]
        bg_row = bg_masks[y]
        for x in range(1, W - 1):
            v = mid[x]
            e = mid[x + 1]
            ne = up[x + 1]
            n = up[x]
            nw = up[x - 1]
            w = mid[x - 1]
            sw = down[x - 1]
            s = down[x]
            se = down[x + 1]
            fg_row[x] = (
                (e > v)
                | ((ne >= v) << 1)
                | ((n >= v) << 2)
                | ((nw >= v) << 3)
                | ((w >= v) << 4)
                | ((sw > v) << 5)
                | ((s > v) << 6)
                | ((se > v) << 7)
            )
            bg_row[x] = (
                (e < v)
                | ((ne <= v) << 1)
                | ((n <= v) << 2)
                | ((nw <= v) << 3)
                | ((w <= v) << 4)
                | ((sw < v) << 5)
                | ((s < v) << 6)
                | ((se < v) << 7)
            )
    flat = img.ravel()
    for y in range(H):
        step = 1 if y == 0 or y == H - 1 else max(W - 1, 1)
        for x in range(0, W, step):
            fg_masks[y, x] = _edge_neighbour_mask(flat, x, y, W, H, True)
            bg_masks[y, x] = _edge_neighbour_mask(flat, x, y, W, H, False)


@njit(cache=True)
def _group_offsets(groups, W, out):
    """``groups`` with ring directions turned into linear pixel offsets for width ``W``."""
    for mask in range(256):
        out[mask, 0] = groups[mask, 0]
        for j in range(1, 5):
            d = groups[mask, j]
            out[mask, j] = _DX8[d] + _DY8[d] * W


# --------------------------------------------------------------------------------------------
# Multi-contour mode (all outer and hole borders), the protocol's MaxBoxAccV2 mode
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _retire_box(box, r, cut, descending, W, H, gt, g0, g1, tree):
    """Root ``r``'s current box stops existing while cut level ``cut`` is being built.

    It existed on the finished levels ``start[r]`` down to ``cut + 1`` (descending sweep) or up
    to ``cut - 1`` (ascending); its best IoU is folded into those levels' maxima. A box that
    appeared at this very level was never in a finished binary image and is dropped. The box is
    the contour's ``cv2.boundingRect`` in protocol form: an outer border's far corner is one past
    the component's last pixel; a hole border runs one pixel outside the hole on every side.
    """
    start = box[_START, r]
    if (start <= cut) if descending else (start >= cut):
        return
    grow = 0 if descending else 1
    iou = _best_gt_iou(
        box[_X0, r] - grow,
        box[_Y0, r] - grow,
        min(box[_X1, r] + 1 + grow, W - 1),
        min(box[_Y1, r] + 1 + grow, H - 1),
        gt,
        g0,
        g1,
    )
    lo, hi = (cut + 1, start) if descending else (start, cut - 1)
    _range_max(tree, lo, hi, iou, iou, tree)


@njit(cache=True, inline="always")
def _larger_box_first(box, a, b):
    """Order two roots so the one with the larger box (half-perimeter) survives a merge.

    Union by box size instead of set size: no per-pixel size count to maintain (the sweeps attach
    every pixel to a root, so that count would cost a store per pixel), and a set's box grows with
    the set. Path halving in :func:`_find` keeps the trees shallow either way.
    """
    if box[_X1, a] - box[_X0, a] + box[_Y1, a] - box[_Y0, a] < (box[_X1, b] - box[_X0, b] + box[_Y1, b] - box[_Y0, b]):
        return b, a
    return a, b


@njit(cache=True, inline="always")
def _box_grows(box, a, x0, y0, x1, y1):
    return x0 < box[_X0, a] or y0 < box[_Y0, a] or x1 > box[_X1, a] or y1 > box[_Y1, a]


@njit(cache=True, inline="always")
def _set_box(box, a, x0, y0, x1, y1):
    box[_X0, a] = min(box[_X0, a], x0)
    box[_Y0, a] = min(box[_Y0, a], y0)
    box[_X1, a] = max(box[_X1, a], x1)
    box[_Y1, a] = max(box[_Y1, a], y1)


@njit(cache=True)
def _sweep(flat, H, W, order, starts, links, descending, gt, g0, g1, parent, box, tree, counts):
    """One union-find sweep; adds its number of contours per cut level to ``counts``.

    ``descending``: 8-connected foreground components, building cut levels 254 down to 0.
    Otherwise: holes, i.e. 4-connected background components not joined to the frame node
    ``H * W``, building cut levels 0 up to 254.
    """
    start = box[_START]
    frame = H * W
    if not descending:
        parent[frame] = frame
    shift = _FG_SHIFT if descending else _BG_SHIFT
    n_sets = 0
    for step in range(NUM_LEVELS - 1):
        v = NUM_LEVELS - 1 - step if descending else step
        cut = v - 1 if descending else v
        for k in range(starts[v], starts[v + 1]):
            entry = order[k]
            y = (entry >> _Y_SHIFT) & _COORD
            x = (entry >> _X_SHIFT) & _COORD
            p = entry & _INDEX
            mask = (entry >> shift) & 0xFF
            n_groups = links[mask, 0]
            on_edge = not descending and (x == 0 or y == 0 or x == W - 1 or y == H - 1)
            if n_groups == 0 and not on_edge:
                # A new component (or hole): its own root.
                parent[p] = p
                box[_X0, p] = x
                box[_Y0, p] = y
                box[_X1, p] = x
                box[_Y1, p] = y
                start[p] = cut
                n_sets += 1
                continue
            if on_edge:
                # Edge pixels are 4-adjacent to the zero frame findContours pads around the image.
                r = frame
                first_group = 1
            else:
                r = _find(parent, p + links[mask, 1])
                first_group = 2
            # Attach the pixel to root r, growing r's box.
            parent[p] = r
            if r != frame and _box_grows(box, r, x, y, x, y):
                _retire_box(box, r, cut, descending, W, H, gt, g0, g1, tree)
                _set_box(box, r, x, y, x, y)
                start[r] = cut
            # Merge r with the sets of the other neighbour groups.
            for j in range(first_group, n_groups + 1):
                b = _find(parent, p + links[mask, j])
                if b == r:
                    continue
                # The frame always survives (a hole joining it stops being a hole).
                if b == frame:
                    a, b = b, r
                elif r == frame:
                    a = r
                else:
                    a, b = _larger_box_first(box, r, b)
                # `b` is merged away (ascending: or joins the frame and stops being a hole).
                _retire_box(box, b, cut, descending, W, H, gt, g0, g1, tree)
                if a != frame and _box_grows(box, a, box[_X0, b], box[_Y0, b], box[_X1, b], box[_Y1, b]):
                    _retire_box(box, a, cut, descending, W, H, gt, g0, g1, tree)
                    _set_box(box, a, box[_X0, b], box[_Y0, b], box[_X1, b], box[_Y1, b])
                    start[a] = cut
                parent[b] = a
                n_sets -= 1
                r = a
        counts[cut] += n_sets
    # The boxes still alive after the last level: as if retired while building the level past it.
    past_last = -1 if descending else NUM_LEVELS - 1
    for p in range(H * W):
        added = flat[p] > 0 if descending else flat[p] < NUM_LEVELS - 1
        if added and parent[p] == p:
            _retire_box(box, p, past_last, descending, W, H, gt, g0, g1, tree)


# --------------------------------------------------------------------------------------------
# Largest-contour mode (MaxBoxAcc v1)
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _outer_border_area2(flat, H, W, cut, s):
    """Twice the shoelace area of the outer border of the component whose first pixel is ``s``.

    Suzuki & Abe (1985), steps 3.1-3.5, for an outer border started at its first pixel in raster
    order (whose left neighbour is background): find ``i1`` clockwise from the left neighbour, then
    repeatedly search counter-clockwise from the pixel after the previous one, stopping when the
    trace is back at the start coming from ``i1``. This is the polygon cv2.contourArea measures.
    """
    y0 = s // W
    x0 = s - y0 * W
    # 3.1: clockwise from the west neighbour (direction 4) for the first foreground neighbour.
    first_dir = -1
    for step in range(1, 8):
        d = (4 - step) % 8
        xx = x0 + _DX8[d]
        yy = y0 + _DY8[d]
        if 0 <= xx < W and 0 <= yy < H and flat[yy * W + xx] > cut:
            first_dir = d
            break
    if first_dir < 0:
        return 0  # isolated pixel
    x1 = x0 + _DX8[first_dir]
    y1 = y0 + _DY8[first_dir]
    # 3.2-3.5: (cx, cy) is the current pixel, `back` the direction from it to the previous one.
    cx = x0
    cy = y0
    back = first_dir
    twice_area = 0
    while True:
        nx = cx
        ny = cy
        found = back
        for step in range(1, 9):
            d = (back + step) % 8
            xx = cx + _DX8[d]
            yy = cy + _DY8[d]
            if 0 <= xx < W and 0 <= yy < H and flat[yy * W + xx] > cut:
                found = d
                nx = xx
                ny = yy
                break
        twice_area += cx * ny - nx * cy
        if nx == x0 and ny == y0 and cx == x1 and cy == y1:
            break
        back = (found + 4) % 8
        cx = nx
        cy = ny
    return abs(twice_area)


@njit(cache=True)
def _largest_contour_sweep(
    flat,
    H,
    W,
    order,
    starts,
    links,
    gt,
    g0,
    g1,
    parent,
    box,
    first,
    stamp,
    dirty,
    rec_key,
    rec_iou,
    keys,
    values,
    counts,
):
    """Foreground sweep keeping, per cut level, the outer border with the largest polygon area.

    Every component that changed while building a level gets a new record (area key, IoU of its
    box) at the end of the level; the old record is folded into the range-argmax tree.
    """
    start = box[_START]
    n_pixels = H * W
    n_components = 0
    for v in range(NUM_LEVELS - 1, 0, -1):
        cut = v - 1
        n_dirty = 0
        for k in range(starts[v], starts[v + 1]):
            entry = order[k]
            y = (entry >> _Y_SHIFT) & _COORD
            x = (entry >> _X_SHIFT) & _COORD
            p = entry & _INDEX
            mask = (entry >> _FG_SHIFT) & 0xFF
            n_groups = links[mask, 0]
            parent[p] = p
            box[_X0, p] = x
            box[_Y0, p] = y
            box[_X1, p] = x
            box[_Y1, p] = y
            first[p] = p
            start[p] = _NO_RECORD
            stamp[p] = NUM_LEVELS
            n_components += 1
            r = p
            for j in range(1, n_groups + 1):
                b = _find(parent, p + links[mask, j])
                if b == r:
                    continue
                a, b = _larger_box_first(box, r, b)
                # `b` disappears now; `a` is dirty and gets its record closed at the level's end.
                if start[b] > cut:
                    _range_max(keys, cut + 1, start[b], rec_key[b], rec_iou[b], values)
                _set_box(box, a, box[_X0, b], box[_Y0, b], box[_X1, b], box[_Y1, b])
                first[a] = min(first[a], first[b])
                parent[b] = a
                n_components -= 1
                r = a
            dirty[n_dirty] = r
            n_dirty += 1
        for k in range(n_dirty):
            r = _find(parent, dirty[k])
            if stamp[r] == cut:
                continue
            stamp[r] = cut
            if start[r] > cut:
                _range_max(keys, cut + 1, start[r], rec_key[r], rec_iou[r], values)
            area2 = _outer_border_area2(flat, H, W, cut, first[r])
            # Larger area wins; among equal areas the component found last in raster order, which
            # OpenCV lists first.
            rec_key[r] = area2 * n_pixels + first[r]
            rec_iou[r] = _best_gt_iou(
                box[_X0, r],
                box[_Y0, r],
                min(box[_X1, r] + 1, W - 1),
                min(box[_Y1, r] + 1, H - 1),
                gt,
                g0,
                g1,
            )
            start[r] = cut
        counts[cut] = 1 if n_components > 0 else 0
    for p in range(n_pixels):
        if flat[p] > 0 and parent[p] == p:
            _range_max(keys, 0, start[p], rec_key[p], rec_iou[p], values)


# --------------------------------------------------------------------------------------------
# Batch driver
# --------------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _levels_batch(
    maps,
    gt,
    gt_offsets,
    largest_contour,
    groups8,
    groups4,
    parent_type,
    n_chunks,
    iou_out,
    count_out,
    max_out,
):
    """Fill ``iou_out``/``count_out`` ``[N, 256]`` and ``max_out`` ``[N]``; images in parallel.

    Images are split into ``n_chunks`` contiguous runs; each run allocates its work arrays once.
    ``parent_type`` is an empty array whose dtype the union-find parents take (uint16 or int32).
    """
    n, H, W = maps.shape
    n_pixels = H * W
    for chunk in prange(n_chunks):
        order = np.empty(n_pixels, np.int64)
        starts = np.empty(NUM_LEVELS + 1, np.int64)
        parent = np.empty(n_pixels + 1, parent_type.dtype)  # + 1: the frame node
        box = np.empty((_BOX_ROWS, n_pixels + 1), np.int32)
        masks = np.empty((2, H, W), np.uint8)
        links8 = np.empty((256, 5), np.int64)
        links4 = np.empty((256, 5), np.int64)
        _group_offsets(groups8, W, links8)
        _group_offsets(groups4, W, links4)
        tree = np.empty(2 * NUM_LEVELS, np.float64)
        counts = np.empty(NUM_LEVELS, np.int64)
        records = n_pixels if largest_contour else 1  # only the v1 sweep keeps per-root records
        first = np.empty(records, np.int32)
        stamp = np.empty(records, np.int16)
        dirty = np.empty(records, np.int32)
        rec_key = np.empty(records, np.int64)
        rec_iou = np.empty(records, np.float64)
        keys = np.empty(2 * NUM_LEVELS, np.int64)
        for i in range(chunk * n // n_chunks, (chunk + 1) * n // n_chunks):
            flat = maps[i].ravel()
            g0 = gt_offsets[i]
            g1 = gt_offsets[i + 1]
            _neighbour_masks(maps[i], masks[0], masks[1])
            _sort_pixels(maps[i], masks, order, starts)
            top = NUM_LEVELS - 1
            while starts[top] == n_pixels:  # no pixel of value `top`
                top -= 1
            max_out[i] = top
            counts[:] = 0
            if largest_contour:
                keys[:] = -1
                tree[:] = 0.0
                _largest_contour_sweep(
                    flat,
                    H,
                    W,
                    order,
                    starts,
                    links8,
                    gt,
                    g0,
                    g1,
                    parent,
                    box,
                    first,
                    stamp,
                    dirty,
                    rec_key,
                    rec_iou,
                    keys,
                    tree,
                    counts,
                )
                for level in range(NUM_LEVELS):
                    iou_out[i, level] = _point_query(keys, tree, level)
            else:
                tree[:] = -1.0
                # Two explicit calls (not a loop over the pair): numba specializes each better.
                _sweep(
                    flat,
                    H,
                    W,
                    order,
                    starts,
                    links8,
                    True,
                    gt,
                    g0,
                    g1,
                    parent,
                    box,
                    tree,
                    counts,
                )
                _sweep(
                    flat,
                    H,
                    W,
                    order,
                    starts,
                    links4,
                    False,
                    gt,
                    g0,
                    g1,
                    parent,
                    box,
                    tree,
                    counts,
                )
                for level in range(NUM_LEVELS):
                    iou_out[i, level] = _point_query(tree, tree, level)
            # No contour at all: the protocol scores the box (0, 0, 0, 0).
            no_box_iou = _best_gt_iou(0, 0, 0, 0, gt, g0, g1)
            for level in range(NUM_LEVELS):
                if counts[level] == 0:
                    iou_out[i, level] = no_box_iou
                    count_out[i, level] = 1
                else:
                    count_out[i, level] = counts[level]


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------


class LevelScores(NamedTuple):
    """Per map and cut level ``c`` (the binary image ``map > c``), what the protocol scores."""

    iou: np.ndarray
    """``float64 [N, 256]`` best IoU over the predicted boxes x GT boxes."""
    num_boxes: np.ndarray
    """``int32 [N, 256]`` number of predicted boxes (1 for the ``(0, 0, 0, 0)`` stand-in)."""
    map_max: np.ndarray
    """``uint8 [N]`` each map's maximum, which with a threshold gives the cut level."""


def best_iou_per_level(
    maps: np.ndarray,
    gt_boxes: np.ndarray,
    gt_offsets: np.ndarray,
    *,
    largest_contour: bool = False,
) -> LevelScores:
    """Best IoU and box count for each of the 256 cut levels of each map (the numba kernel).

    Args:
        maps: ``uint8 [N, H, W]`` C-contiguous score maps, already validated.
        gt_boxes: ``int64 [M, 4]`` GT boxes of all images, ``x0, y0, x1, y1`` inclusive, in map
            coordinates, validated.
        gt_offsets: ``int64 [N + 1]``; the boxes of image ``i`` are ``gt_boxes[o[i]:o[i+1]]``
            (at least one each).
        largest_contour: v1 mode, only the largest contour per level.

    Returns:
        :class:`LevelScores`. A level without contours scores the box ``(0, 0, 0, 0)`` and counts
        one box, as the protocol does.
    """
    n = maps.shape[0]
    iou = np.empty((n, NUM_LEVELS), np.float64)
    counts = np.empty((n, NUM_LEVELS), np.int32)
    map_max = np.empty(n, np.uint8)
    if n == 0:
        return LevelScores(iou, counts, map_max)
    # uint16 parents when every node (pixels + frame) fits, as for 224 x 224 maps: the sweeps are
    # bound by random accesses to this array, and half its size measured ~8% faster.
    parent_type = np.empty(0, np.uint16 if maps[0].size < 65535 else np.int32)
    threads = numba.get_num_threads()
    # A handful of maps is not worth waking other threads (a few ms on a loaded machine).
    numba.set_num_threads(max(1, min(threads, n // _MIN_MAPS_PER_THREAD)))
    try:
        # Several runs of images per thread, handed out one at a time (chunk size 1): balances
        # uneven maps (speckle costs more than a smooth blob) and threads slowed by other load.
        n_chunks = min(n, 8 * numba.get_num_threads())
        with numba.parallel_chunksize(1):
            _levels_batch(
                maps,
                gt_boxes,
                gt_offsets,
                largest_contour,
                _GROUPS8,
                _GROUPS4,
                parent_type,
                n_chunks,
                iou,
                counts,
                map_max,
            )
    finally:
        numba.set_num_threads(threads)  # thread-local setting: restore the caller's
    return LevelScores(iou, counts, map_max)


def cut_level_table(thresholds: np.ndarray) -> np.ndarray:
    """``int(t * m)`` for every possible map maximum ``m`` (row) and threshold ``t``: ``[256, T]``.

    Computed in float64 exactly as the protocol's ``int(threshold * np.max(map))`` (a float64 times
    a small integer, truncated), so every threshold lands on the same cut level as in the field's
    evaluator. A map's cut levels are the row of its maximum, so this table is all the per-batch
    work needs: a gather, no float arithmetic per image and threshold.
    """
    maxima = np.arange(NUM_LEVELS, dtype=np.float64)
    return np.trunc(maxima[:, None] * np.asarray(thresholds, np.float64)[None, :]).astype(np.int64)


def best_iou_per_threshold(
    maps: np.ndarray | torch.Tensor,
    gt_boxes: Sequence[np.ndarray | torch.Tensor],
    thresholds: np.ndarray | torch.Tensor | Sequence[float],
    *,
    largest_contour: bool = False,
    return_num_boxes: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per image and threshold, the best IoU over all predicted boxes x all GT boxes.

    Args:
        maps: ``uint8 [N, H, W]`` quantized score maps (224 x 224 in the protocol), numpy or torch
            on any device.
        gt_boxes: ``N`` integer arrays ``[k_i, 4]`` (``k_i >= 1``), ``x0, y0, x1, y1`` inclusive, in
            map coordinates (see :func:`~wsol_core.metrics.preparation.rescale_boxes`).
        thresholds: 1-D increasing floats in ``[0, 1]``, e.g. ``np.arange(0, 1, 0.001)``.
        largest_contour: only the contour with the largest area (MaxBoxAcc v1) instead of every
            contour, holes included (MaxBoxAccV2).
        return_num_boxes: also return the number of predicted boxes per threshold (the number of
            contours, or 1 when there is none and the ``(0, 0, 0, 0)`` box stands in; always 1 in
            largest-contour mode).

    Returns:
        ``float64 [N, T]`` best IoUs, and ``int32 [N, T]`` box counts if asked for.

    Raises:
        ValueError: on a wrong shape or dtype, or a GT box that is inverted or leaves the map; the
            message names the image index.
    """
    maps_np = as_uint8_maps(maps)
    thr = check_thresholds(thresholds)
    n, height, width = maps_np.shape
    gt, offsets = flatten_gt_boxes(gt_boxes, n, height, width)
    levels = best_iou_per_level(maps_np, gt, offsets, largest_contour=largest_contour)
    cuts = cut_level_table(thr)[levels.map_max]
    iou = np.take_along_axis(levels.iou, cuts, axis=1)
    if not return_num_boxes:
        return iou
    return iou, np.take_along_axis(levels.num_boxes, cuts, axis=1)
