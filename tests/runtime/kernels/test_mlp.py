"""FP8 SwiGLU MLP (dense layers, shared expert) and its tensor-parallel slices vs fp32 references."""

import pytest
import torch
from ffn_inputs import DEVICE, REQUANT_TOL, fp8_weight, randn, rel_err

from converters.errors import Step3Error
from quant.fp8 import dequantize_fp8
from runtime.kernels.act_quant import act_dequant, act_quant, act_quant_ref
from runtime.kernels.fp8_linear import SCALED_MM_MIN_TOKENS, fp8_matmul
from runtime.kernels.mlp import MlpWeights, mlp_tp_slice, silu_mul_quant, swiglu_mlp, swiglu_mlp_ref
from runtime.model import reference


def _weights(hidden: int, inter: int, seed: int) -> MlpWeights:
    gen = torch.Generator().manual_seed(seed)
    g, gs = fp8_weight((inter, hidden), gen)
    u, us = fp8_weight((inter, hidden), gen)
    d, ds = fp8_weight((hidden, inter), gen)
    return MlpWeights(g, gs, u, us, d, ds, name="layers.0.mlp")


@pytest.mark.parametrize("T, hidden, inter", [(1, 256, 128), (23, 200, 192), (40, 320, 256)])
def test_swiglu_mlp_matches_reference(T, hidden, inter):
    w = _weights(hidden, inter, seed=T)
    x = randn((T, hidden), torch.Generator().manual_seed(T + 1))
    y = swiglu_mlp(x, w)
    assert y.shape == (T, hidden) and y.dtype == x.dtype
    assert rel_err(y, swiglu_mlp_ref(x, w)) < REQUANT_TOL
    # against the model's eager reference on dequantized weights: only the two FP8 activation
    # quantizations (~2.6% rms each, amplified by silu * up) separate them
    pairs = ((w.gate, w.gate_scale), (w.up, w.up_scale), (w.down, w.down_scale))
    deq = [dequantize_fp8(t, s) for t, s in pairs]
    assert rel_err(y, reference.mlp(x.float(), *deq)) < 8e-2


def test_silu_mul_quant_matches_reference():
    gen = torch.Generator().manual_seed(2)
    g, u = randn((33, 300), gen, 3.0), randn((33, 300), gen, 3.0)
    got, want = silu_mul_quant(g, u), act_quant_ref(torch.nn.functional.silu(g) * u)
    # silu rounds differently in the kernel, which can move a value across an FP8 rounding midpoint
    same = (got.q.view(torch.uint8) == want.q.view(torch.uint8)).float().mean().item()
    assert same > 0.995
    assert torch.allclose(got.scale_inv, want.scale_inv, rtol=1e-5)
    assert rel_err(act_dequant(got), act_dequant(want)) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [5, 300])
def test_cublas_first_half_matches_fused_on_gpu(T):
    w = _weights(1024, 512, seed=T)
    x = randn((T, 1024), torch.Generator().manual_seed(T)).bfloat16()
    ref = swiglu_mlp_ref(x, w)
    for first_half in ("fused", "scaled_mm"):
        assert rel_err(swiglu_mlp(x, w, first_half=first_half), ref) < 1.5e-2  # bf16 rounding inside


def test_gate_and_up_are_halves_of_one_tensor():
    """Whole 128-row blocks: gate and up (and their scales) are packed into one [2I, H] tensor once, and
    weights that already are its halves (a TP slice's source, a second construction) are not copied."""
    gen = torch.Generator().manual_seed(5)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((256, 320), (256, 320), (320, 256)))
    w = MlpWeights(g, gs, u, us, d, ds)
    packed, scales = w.gate_up
    assert torch.equal(packed.view(torch.uint8), torch.cat([g, u]).view(torch.uint8))
    assert torch.equal(scales, torch.cat([gs, us]))
    assert w.gate.data_ptr() == packed.data_ptr() and w.up.data_ptr() == packed[256:].data_ptr()
    again = MlpWeights(w.gate, w.gate_scale, w.up, w.up_scale, d, ds)
    assert again.gate_up[0].data_ptr() == packed.data_ptr()
    odd = _weights(256, 192, seed=1)  # 192 rows: the scale blocks would not stack
    assert odd.gate_up is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [64, 300])
def test_one_gemm_first_half_is_bit_equal_to_two_on_gpu(T):
    """cuBLAS's first half over [gate; up] gives the same bits as a GEMM for each."""
    w = _weights(1024, 512, seed=T)
    x = act_quant(randn((T, 1024), torch.Generator().manual_seed(T)).bfloat16())
    two = silu_mul_quant(*(fp8_matmul(x, t, s, torch.float32) for t, s in ((w.gate, w.gate_scale),
                                                                             (w.up, w.up_scale))))
    one = swiglu_mlp(x, w, first_half="scaled_mm")
    want = fp8_matmul(two, w.down, w.down_scale, torch.bfloat16)
    assert torch.equal(one.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T, first_half", [(SCALED_MM_MIN_TOKENS - 1, "fused"),
                                           (SCALED_MM_MIN_TOKENS, "scaled_mm")])
def test_auto_first_half_is_cublas_where_fp8_matmul_is(T, first_half):
    """The default first half is cuBLAS's from the token count where fp8_matmul takes cuBLAS (Hopper)."""
    w = _weights(1024, 512, seed=T)
    x = randn((T, 1024), torch.Generator().manual_seed(T)).bfloat16()
    assert torch.equal(swiglu_mlp(x, w), swiglu_mlp(x, w, first_half=first_half))


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_slices_sum_to_the_whole(world):
    w = _weights(320, 512, seed=world)
    x = randn((9, 320), torch.Generator().manual_seed(world))
    full = swiglu_mlp(x, w)
    parts = [swiglu_mlp(x, mlp_tp_slice(w, r, world)) for r in range(world)]
    assert parts[0].shape == full.shape
    assert rel_err(sum(parts), full) < (1e-5 if DEVICE.type == "cpu" else 2e-3)
    assert rel_err(parts[0], full) > 0.1  # a slice alone is not the answer


def test_bad_slices_and_shapes_are_named():
    w = _weights(256, 192, seed=0)
    with pytest.raises(Step3Error, match="128-column"):
        mlp_tp_slice(w, 0, 2)
    with pytest.raises(Step3Error, match="hidden size 256"):
        swiglu_mlp(randn((3, 128), torch.Generator().manual_seed(0)), w)
    with pytest.raises(Step3Error, match="up_proj"):
        MlpWeights(w.gate, w.gate_scale, w.down, w.up_scale, w.down, w.down_scale)
