"""FP8 linear (act_quant + block-FP8 GEMM) vs dequantized fp32 references; cuBLAS path on a GPU."""

import pytest
import torch
from ffn_inputs import DEVICE, EXACT_TOL, FP8_ACT_TOL, fp8_weight, randn, rel_err

from converters.errors import Step3Error
from quant.fp8 import dequantize_fp8
from runtime.kernels.act_quant import act_quant
from runtime.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from runtime.kernels.fp8_linear import Fp8Linear, fp8_linear, fp8_linear_ref, scaled_mm_usable

SHAPES = [(1, 256, 128), (37, 300, 200), (70, 384, 256)]  # (tokens, in, out); 300/200: edge blocks


@pytest.mark.parametrize("T, K, N", SHAPES)
def test_triton_block_fp8_gemm_matches_dequantized_product(T, K, N):
    gen = torch.Generator().manual_seed(T + K)
    xq = act_quant(randn((T, K), gen))
    w, ws = fp8_weight((N, K), gen)
    for block_m, block_n in ((16, 64), (64, 128), (32, 256)):
        out = torch.full((T, N), float("nan"), device=DEVICE)  # poisoned: every element must be written
        fp8_gemm(xq.q, xq.scale_inv, w, ws, out, block_m=block_m, block_n=block_n)
        assert rel_err(out, fp8_gemm_ref(xq.q, xq.scale_inv, w, ws)) < EXACT_TOL


@pytest.mark.parametrize("T, K, N", SHAPES)
def test_fp8_linear_within_fp8_error_of_the_unquantized_product(T, K, N):
    gen = torch.Generator().manual_seed(N)
    x = randn((T, K), gen)
    w, ws = fp8_weight((N, K), gen)
    y = fp8_linear(x, w, ws)
    assert y.dtype == x.dtype and y.shape == (T, N)
    assert rel_err(y, fp8_linear_ref(x, w, ws)) < EXACT_TOL
    assert rel_err(y, x.float() @ dequantize_fp8(w, ws).t()) < FP8_ACT_TOL


def test_fp8_linear_module_keeps_leading_dims_and_checks_shapes():
    gen = torch.Generator().manual_seed(5)
    w, ws = fp8_weight((128, 256), gen)
    layer = Fp8Linear(w, ws)
    x = randn((2, 3, 256), gen)
    assert rel_err(layer(x), fp8_linear_ref(x, w, ws)) < EXACT_TOL
    with pytest.raises(Step3Error, match="input width 200"):
        layer(randn((4, 200), gen))
    with pytest.raises(Step3Error, match="weight_scale_inv has shape"):
        Fp8Linear(w, ws[:, :1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T", [1, 37, 100, 512])
def test_scaled_mm_blockwise_path_matches_reference(T):
    gen = torch.Generator().manual_seed(T)
    K, N = 7168, 512
    assert scaled_mm_usable(torch.device("cuda"), N, K)
    x = randn((T, K), gen).bfloat16()
    w, ws = fp8_weight((N, K), gen)
    y = fp8_linear(x, w, ws)  # torch._scaled_mm, 1x128 x 128x128 scales (T >= 64; 100: padded rows)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, fp8_linear_ref(x, w, ws)) < 1e-2  # bf16 output rounding
    xq = act_quant(x)
    tri = fp8_gemm(xq.q, xq.scale_inv, w, ws, torch.empty(T, N, device="cuda"))
    assert rel_err(y, tri) < 1e-2


def test_gluon_gate_warns_once_on_hopper_with_another_triton(monkeypatch):
    """Hopper with a Triton outside GLUON_TRITONS: the Gluon kernels are off and one RuntimeWarning says so
    (naming the Triton); a listed Triton turns them on silently; another GPU never warns."""
    import warnings

    import triton

    from runtime.kernels import fp8_linear

    hopper = torch.device("cuda", 0)
    monkeypatch.setattr(fp8_linear, "_capability", lambda index: (9, 0))
    fp8_linear._warn_other_triton.cache_clear()
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    with pytest.warns(RuntimeWarning, match=r"Triton 3\.10\.0.*3\.6, 3\.7, 3\.8, 3\.9"):
        assert not fp8_linear.gluon_usable(hopper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fp8_linear.gluon_usable(hopper)  # once only
        monkeypatch.setattr(triton, "__version__", "3.9.0")
        assert fp8_linear.gluon_usable(hopper)
        monkeypatch.setattr(fp8_linear, "_capability", lambda index: (10, 0))
        monkeypatch.setattr(triton, "__version__", "3.10.0")
        assert not fp8_linear.gluon_usable(hopper)
    fp8_linear._warn_other_triton.cache_clear()
