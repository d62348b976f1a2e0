"""Shared FMCG/ICL blocks (wsol_core/methods/components.py) against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from wsol_core.methods.components import (
    PairwiseNonLocal,
    ProjectionHead,
    channel_attention,
    combine_maps,
    drop_mask,
    info_nce_term,
    masked_mean,
    masked_pool,
    normalize_map,
    pairwise_weights,
    resize_mask,
    scheduled_theta,
    threshold_masks,
    triplet_term,
)


def _map(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# -- SRD: eq. 2, region expansion, schedule -------------------------------------------------


def test_channel_attention_is_the_channel_mean_in_float32():
    x = torch.tensor([[[[1.0, 2.0]], [[3.0, 6.0]]]]).to(torch.bfloat16)  # [1, 2, 1, 2]
    a = channel_attention(x)
    assert a.dtype == torch.float32 and a.shape == (1, 1, 1, 2)
    assert a.flatten().tolist() == [2.0, 4.0]


def test_drop_mask_pixel_level_thresholds_the_per_image_max():
    a = _map([[0.0, 1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0, 9.0], [10.0, 0.0, 0.0, 0.0, 0.0]])
    # theta 0.8: tau = 10 * 0.8 = 8 -> strictly greater: 9 and 10.
    expected = torch.zeros(3, 5)
    expected[1, 4] = expected[2, 0] = 1.0
    assert torch.equal(drop_mask(a, 0.8, 1)[0, 0], expected)
    # theta 1: nothing exceeds the max, nothing is dropped (the schedule's start).
    assert drop_mask(a, 1.0, 1).sum() == 0
    # The max is per image: a scaled copy in the same batch drops the same pixels.
    both = torch.cat([a, 100 * a])
    assert torch.equal(drop_mask(both, 0.8, 1)[1], drop_mask(both, 0.8, 1)[0])


def test_drop_mask_region_grows_each_pixel_to_s_by_s():
    a = torch.zeros(1, 1, 7, 7)
    a[0, 0, 3, 3] = 1.0  # one peak in the middle
    a[0, 0, 0, 6] = 0.95  # one at the top-right corner
    m3 = drop_mask(a, 0.9, 3)[0, 0]
    expected = torch.zeros(7, 7)
    expected[2:5, 2:5] = 1.0
    expected[0:2, 5:7] = 1.0  # clipped at the border
    assert torch.equal(m3, expected)
    m5 = drop_mask(a, 0.9, 5)[0, 0]
    assert m5[1:6, 1:6].all() and m5.sum() == 25 + 9 - 4  # 5x5 around the centre + the corner's clipped 3x3 - overlap
    corner = torch.zeros(7, 7)
    corner[0:3, 4:7] = 1.0
    assert torch.equal(torch.maximum(m5, corner), m5)
    # S = 1 is pixel-level erasing: exactly M_pix.
    assert torch.equal(drop_mask(a, 0.9, 1)[0, 0], (a[0, 0] > 0.9).float())
    assert m3.shape == a.shape[-2:]  # padding S // 2 keeps the size


@pytest.mark.parametrize(
    ("progress", "fraction", "theta"),
    [
        (0.0, 1.0, 1.0),
        (0.5, 1.0, 0.9),
        (1.0, 1.0, 0.8),  # whole-training schedule
        (0.25, 0.5, 0.9),
        (0.5, 0.5, 0.8),
        (0.9, 0.5, 0.8),  # done at half of training, then flat
        (-0.1, 1.0, 1.0),
        (1.5, 1.0, 0.8),  # clamped
    ],  # fmt: skip
)
def test_linear_schedule_from_one_to_theta_drop(progress, fraction, theta):
    assert scheduled_theta(progress, 0.8, fraction) == pytest.approx(theta)


# -- eq. 3: foreground / background masks --------------------------------------------------


def test_threshold_masks_in_each_mode():
    a = _map([[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]])  # max 10, mean 5, min 0
    fg, bg = threshold_masks(a, 0.7, 0.3, "max")  # > 7, < 3
    assert fg.flatten().tolist() == [0, 0, 0, 0, 1, 1] and bg.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    fg, bg = threshold_masks(a, 1.5, 0.5, "mean")  # > 7.5, < 2.5
    assert fg.flatten().tolist() == [0, 0, 0, 0, 1, 1] and bg.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    fg, bg = threshold_masks(a, 1.1, 0.9, "mean")  # > 5.5, < 4.5
    assert fg.flatten().tolist() == [0, 0, 0, 1, 1, 1] and bg.flatten().tolist() == [1, 1, 1, 0, 0, 0]
    shifted = a + 10.0  # min-max normalization removes the offset; "max" does not
    fg, bg = threshold_masks(shifted, 0.7, 0.3, "minmax")
    assert fg.flatten().tolist() == [0, 0, 0, 0, 1, 1] and bg.flatten().tolist() == [1, 1, 0, 0, 0, 0]
    fg, bg = threshold_masks(shifted, 0.7, 0.3, "max")  # 10..20: > 14, < 6 (no background)
    assert fg.flatten().tolist() == [0, 0, 0, 1, 1, 1] and bg.sum() == 0


def test_normalize_and_resize_masks():
    a = _map([[1.0, 2.0], [3.0, 5.0]])
    assert normalize_map(a, "max").flatten().tolist() == pytest.approx([0.2, 0.4, 0.6, 1.0])
    assert normalize_map(a, "minmax").flatten().tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert normalize_map(torch.zeros(1, 1, 2, 2), "minmax").abs().sum() == 0  # flat map: finite zeros
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :2] = 1.0
    m[..., 3, 3] = 1.0  # a lone pixel: a quarter of its 2x2 cell
    assert resize_mask(m, (2, 2))[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert resize_mask(m, (4, 4)) is m


# -- eq. 4 + projection head -----------------------------------------------------------------


def test_masked_pool_means_over_the_mask():
    f = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    pooled = masked_pool(f, masks)
    assert pooled.shape == (1, 3, 2)
    assert pooled[0].tolist() == [[1.5, 5.5], [1.0, 5.0], [0.0, 0.0]]  # empty mask -> zeros
    gap = masked_pool(f, masks, "gap")
    assert gap[0].tolist() == [[0.75, 2.75], [0.25, 1.25], [0.0, 0.0]]


def test_projection_head_is_two_linear_maps_with_relu_and_unit_norm():
    torch.manual_seed(0)
    head = ProjectionHead(6, hidden_dim=5, embed_dim=4)
    v = torch.randn(3, 6)
    z = head(v)
    w1, b1 = head.conv1.weight[:, :, 0, 0], head.conv1.bias
    w2, b2 = head.conv2.weight[:, :, 0, 0], head.conv2.bias
    raw = torch.relu(v @ w1.T + b1) @ w2.T + b2
    torch.testing.assert_close(z, raw / raw.norm(dim=1, keepdim=True))
    assert z.shape == (3, 4) and head.conv1.out_channels == 5
    assert ProjectionHead(6).conv1.out_channels == 6  # hidden 0 -> input width


# -- eq. 5 and InfoNCE ----------------------------------------------------------------------


def test_triplet_term_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    n = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    # row 0: sqrt(2) - 2 + 1; row 1: 0 - sqrt(2) + 1 < 0 -> 0.
    out = triplet_term(a, p, n, 1.0)
    assert out.tolist() == pytest.approx([math.sqrt(2) - 1.0, 0.0])
    assert triplet_term(a, p, n, 0.0).tolist() == pytest.approx([0.0, 0.0])


def test_triplet_term_has_finite_gradient_when_the_branches_coincide():
    a = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = triplet_term(a, a.detach().clone(), torch.tensor([[1.0, 0.0]]), 1.0).sum()
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_info_nce_term_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.0, 1.0]])
    negs = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]])
    # logits (t = 1): [0, -1, 1]
    expected = math.log(math.exp(0) + math.exp(-1) + math.exp(1))
    assert info_nce_term(a, p, negs, 1.0).item() == pytest.approx(expected)
    expected_t = math.log(1 + math.exp(-2) + math.exp(2))  # t = 0.5: [0, -2, 2]
    assert info_nce_term(a, p, negs, 0.5).item() == pytest.approx(expected_t)


def test_masked_mean_skips_invalid_rows():
    v = torch.tensor([1.0, 2.0, 30.0])
    assert masked_mean(v, torch.tensor([True, True, False])).item() == pytest.approx(1.5)
    assert masked_mean(v, torch.tensor([False, False, False])).item() == 0.0


# -- eq. 6-7: pairwise non-local block ------------------------------------------------------


def test_pairwise_weights_by_hand_and_whitening():
    q = torch.tensor([[[1.0, 3.0]]])  # C' = 1, N = 2 -> centred [-1, 1]
    k = torch.tensor([[[0.0, 2.0]]])  # centred [-1, 1]
    w = pairwise_weights(q, k)
    # logits[i, j] = qc_i * kc_j = [[1, -1], [-1, 1]]
    e = math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0))
    torch.testing.assert_close(w[0], torch.tensor([[e, 1 - e], [1 - e, e]]))
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    c = torch.randn(2, 4, 1) * 10  # a per-channel constant over positions
    torch.testing.assert_close(pairwise_weights(q + c, k), pairwise_weights(q, k))
    torch.testing.assert_close(pairwise_weights(q, k - c), pairwise_weights(q, k))
    torch.testing.assert_close(pairwise_weights(q, k).sum(-1), torch.ones(2, 9))


def test_non_local_zero_init_is_the_identity():
    torch.manual_seed(0)
    block = PairwiseNonLocal(8, reduction=2, zero_init=True)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(block(x), x)
    block.eval()
    torch.testing.assert_close(block(x), x)


def test_non_local_matches_eq_7_computed_by_loops():
    torch.manual_seed(0)
    block = PairwiseNonLocal(4, reduction=2, zero_init=False).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
        block.bn.weight.normal_()
    x = torch.randn(1, 4, 2, 3)
    out = block(x)
    with torch.no_grad():
        flat = x[0].reshape(4, 6)

        def conv(layer, t):
            return layer.weight[:, :, 0, 0] @ t + (layer.bias[:, None] if layer.bias is not None else 0)

        q, k, v = conv(block.query, flat), conv(block.key, flat), conv(block.value, flat)
        q = q - q.mean(1, keepdim=True)
        k = k - k.mean(1, keepdim=True)
        y = torch.zeros(2, 6)
        for i in range(6):
            logits = torch.stack([q[:, i] @ k[:, j] for j in range(6)])
            w = torch.exp(logits) / torch.exp(logits).sum()
            y[:, i] = sum(w[j] * v[:, j] for j in range(6))
        hy = conv(block.out, y)
        bn = block.bn
        hy = (hy - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[
            :, None
        ] + bn.bias[:, None]
        expected = (flat + hy).reshape(1, 4, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_non_local_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    block = PairwiseNonLocal(16, zero_init=False, scaled=True)
    x = torch.randn(2, 16, 5, 5).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


# -- inference fusion -----------------------------------------------------------------------


def test_combine_maps_modes():
    o = torch.tensor([[1.0, 4.0]])
    e = torch.tensor([[3.0, 2.0]])
    assert combine_maps(o, e, "max").tolist() == [[3.0, 4.0]]
    assert combine_maps(o, e, "mean").tolist() == [[2.0, 3.0]]
    assert combine_maps(o, e, "erased").tolist() == [[3.0, 2.0]]
    assert combine_maps(o, e, "original").tolist() == [[1.0, 4.0]]
