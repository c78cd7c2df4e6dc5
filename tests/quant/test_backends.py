"""quant/backends.py: backend choice, and the same bytes from torch (CPU/CUDA) and Transformer Engine."""

from __future__ import annotations

import pytest
import torch

from converters.errors import Step3Error
from quant.backends import quantize_weight, resolve_backend, resolve_device
from quant.fp8 import quantize_fp8
from quant.te_backend import te_import_error

HAS_CUDA = torch.cuda.is_available()
HAS_TE = te_import_error() is None

# Odd shapes (edge blocks in one or both dims), 3-D experts, and inputs that stress the arithmetic:
# a huge dynamic range across blocks, all-zero blocks, and tiny magnitudes (huge scales).
EQUALITY_SHAPES = [(128, 128), (300, 200), (1, 1), (129, 257), (512, 384), (4, 300, 200), (3, 256, 1000)]


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = w * torch.logspace(-4, 4, shape[-1]).reshape(*([1] * (len(shape) - 1)), shape[-1])
    yield "randn*logspace", w
    z = torch.randn(shape, generator=g) * 0.02
    z[..., :128, :128] = 0
    yield "zero-block", z
    yield "tiny", torch.randn(shape, generator=g) * 1e-30  # scales near 1e32, still normal fp32


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return (torch.equal(a[0].cpu().view(torch.uint8), b[0].cpu().view(torch.uint8))
            and torch.equal(a[1].cpu(), b[1].cpu()))


def test_resolve_backend_names():
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto") == ("te" if HAS_TE else "torch")
    with pytest.raises(Step3Error, match="--backend 'fast'"):
        resolve_backend("fast")


@pytest.mark.skipif(HAS_TE, reason="TE is usable here; the error path needs a machine without it")
def test_te_backend_unavailable_is_a_named_error():
    with pytest.raises(Step3Error, match=r"--backend te: .*--backend torch"):
        resolve_backend("te")


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_is_a_named_error():
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(Step3Error, match="--device cuda"):
        resolve_device("cuda")


@pytest.mark.parametrize("shape", [(300, 200), (3, 300, 200)])  # 3-D: quantized one expert at a time
def test_torch_backend_matches_pure_function(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    q, s = quantize_weight(w, "torch", name="x")
    assert q.device.type == "cpu" and _same((q, s), quantize_fp8(w))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", EQUALITY_SHAPES)
def test_torch_cuda_matches_torch_cpu(shape):
    for dtype in (torch.float32, torch.bfloat16):
        for label, w in _inputs(shape, seed=sum(shape)):
            w = w.to(dtype)
            assert _same(quantize_weight(w, "torch", device="cuda"), quantize_fp8(w)), (label, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or not HAS_TE, reason="needs a CUDA GPU with Transformer Engine")
@pytest.mark.parametrize("shape", EQUALITY_SHAPES)
def test_te_matches_torch_bytes(shape):
    for dtype in (torch.float32, torch.bfloat16):
        for label, w in _inputs(shape, seed=sum(shape)):
            w = w.to(dtype)
            te = quantize_weight(w, "te", device="cuda")
            assert te[1].shape == quantize_fp8(w)[1].shape
            assert _same(te, quantize_fp8(w)), (label, dtype)
