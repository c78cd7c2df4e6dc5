"""quant/fp8.py: block-FP8 arithmetic against hand-computed values and an independent float64 reference."""

from __future__ import annotations

import pytest
import torch

from converters.errors import Step3Error
from quant.fp8 import BLOCK, FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8, scale_grid_shape

ODD_SHAPES = [(128, 128), (300, 200), (1, 1), (129, 257), (64, 384), (3, 300, 200), (2, 128, 130)]


def _random(shape, seed=0, scale=1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _f64_reference(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block loops in float64, written independently of quant/fp8.py's vectorized code.

    448/amax is rounded once to fp32 (double rounding through float64 is exact for a division of
    two fp32 values); the fp32 product w*scale is exact in float64 before its one rounding to fp32.
    """
    w2 = w.reshape(-1, *w.shape[-2:]).float()
    q_all, s_all = [], []
    for m in w2:
        rows, cols = m.shape
        q = torch.empty(rows, cols, dtype=FP8_DTYPE)
        s = torch.empty(-(-rows // block), -(-cols // block), dtype=torch.float32)
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                tile = m[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block]
                amax = tile.abs().max().double()
                scale = (FP8_MAX / amax).float() if amax > 0 else torch.tensor(1.0)
                prod = (tile.double() * scale.double()).float().clamp(-FP8_MAX, FP8_MAX)
                q[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block] = prod.to(FP8_DTYPE)
                s[bi, bj] = (1.0 / scale.double()).float()
        q_all.append(q)
        s_all.append(s)
    return (torch.stack(q_all).reshape(w.shape),
            torch.stack(s_all).reshape(scale_grid_shape(w.shape, block)))


def test_hand_computed_partial_block():
    # One 2x3 edge block. amax 4 -> scale 112; -3*112 = -336 lies halfway between the E4M3 values
    # 320 and 352 and rounds to the even mantissa (320); 0.1*112 = 11.2 -> 11.
    w = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.1, -3.0]])
    q, s = quantize_fp8(w)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert q.float().tolist() == [[112.0, -224.0, 56.0], [448.0, 11.0, -320.0]]
    assert s.shape == (1, 1) and s.item() == pytest.approx(1 / 112, rel=1e-7)


def test_hand_computed_blocks_each_get_their_own_scale():
    w = torch.zeros(130, 131)
    w[:128, :128] = 0.25
    w[5, 7] = -2.0  # block (0,0): amax 2 -> scale 224
    w[128:, 128:] = torch.tensor([[0.5, -0.125, 0.0], [0.25, 0.0, 0.0]])  # edge block (1,1): amax 0.5 -> 896
    w[129, 3] = 8.0  # edge block (1,0): amax 8 -> 56;  block (0,1) stays all zero
    q, s = quantize_fp8(w)
    expected = 1 / torch.tensor([[224.0, 1.0], [56.0, 896.0]])  # reciprocals rounded to fp32
    assert torch.equal(s, expected)
    assert q[0, 0].item() == 56.0 and q[5, 7].item() == -448.0
    assert q[128, 128].item() == 448.0 and q[128, 129].item() == -112.0
    assert q[129, 3].item() == 448.0 and q[:128, 128:].float().abs().sum() == 0


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_scale_shapes_and_f64_reference(shape):
    w = _random(shape, seed=len(shape) * 1000 + shape[-1], scale=0.02)
    q, s = quantize_fp8(w)
    assert q.shape == w.shape
    assert s.shape == scale_grid_shape(shape) == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    q_ref, s_ref = _f64_reference(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


def test_experts_are_quantized_independently():
    w = _random((3, 200, 130), seed=3)
    w[1] *= 1000.0  # one loud expert must not change the others' scales
    q, s = quantize_fp8(w)
    for e in range(3):
        qe, se = quantize_fp8(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_elementwise_e4m3_error_bound(magnitude):
    w = _random((257, 300), seed=11, scale=magnitude)
    q, s = quantize_fp8(w)
    deq = dequantize_fp8(q, s)
    err = (deq - w).abs()
    # where w*scale is a normal E4M3 value (>= 2^-6), rounding is within half an ulp: 2^-4 relative;
    # below that the grid is the subnormal step 2^-9, so the error is at most 2^-10 in scaled units.
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:257, :300]
    scaled = w.abs() / s_full
    normal = scaled >= 2.0 ** -6
    assert normal.float().mean() > 0.9
    assert (err[normal] <= 2.0 ** -4 * w.abs()[normal] * (1 + 1e-6)).all()
    assert (err[~normal] <= 2.0 ** -10 * s_full[~normal] * (1 + 1e-6)).all()
    assert err.max() > 0  # quantization really happened


def test_zero_blocks_get_finite_scale_and_zero_payload():
    q, s = quantize_fp8(torch.zeros(200, 300))
    assert torch.isfinite(s).all() and (s == 1.0).all() and (q.float() == 0).all()
    w = _random((256, 256), seed=5)
    w[:128, 128:] = 0
    q, s = quantize_fp8(w)
    assert s[0, 1].item() == 1.0 and torch.isfinite(dequantize_fp8(q, s)).all()


def test_tiny_amax_keeps_scales_finite():
    w = torch.full((4, 4), 1e-40)  # 448/amax overflows fp32: scale becomes FLT_MAX, as in TE
    q, s = quantize_fp8(w)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected_with_tensor_name(bad):
    w = _random((130, 140), seed=2)
    w[129, 1] = bad
    with pytest.raises(Step3Error, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*NaN/Inf"):
        quantize_fp8(w, name="model.layers.3.mlp.up_proj.weight")


def test_vector_rejected():
    with pytest.raises(Step3Error, match="model.norm.weight"):
        quantize_fp8(torch.ones(8), name="model.norm.weight")


def test_bf16_input_matches_its_fp32_values():
    w = _random((200, 260), seed=7, dtype=torch.bfloat16)
    q_b, s_b = quantize_fp8(w)
    q_f, s_f = quantize_fp8(w.float())
    assert torch.equal(q_b.view(torch.uint8), q_f.view(torch.uint8)) and torch.equal(s_b, s_f)


def test_dequantize_round_trip_is_exact_on_fp8_grid():
    q, s = quantize_fp8(_random((3, 140, 260), seed=8))
    q2, s2 = quantize_fp8(dequantize_fp8(q, s))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.allclose(s2, s, rtol=1e-6, atol=0)


def test_dequantize_rejects_wrong_scale_shape():
    q, s = quantize_fp8(_random((300, 200), seed=9))
    with pytest.raises(Step3Error, match=r"expected \(3, 2\)"):
        dequantize_fp8(q, s[:, :1])


def test_dequantize_names_the_tensor_whose_scale_grid_is_wrong():
    q, scale_inv = quantize_fp8(torch.randn(300, 200, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(Step3Error, match=r"layers\.0\.mlp\.up_proj\.weight: weight_scale_inv has shape"):
        dequantize_fp8(q, scale_inv[:, :1], name="model.layers.0.mlp.up_proj.weight")
