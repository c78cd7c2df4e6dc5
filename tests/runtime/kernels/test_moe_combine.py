"""moe_combine.combine_pairs against torch: the sum over the k slots of each token, plus an addend."""

import pytest
import torch
from ffn_inputs import DEVICE, randn

from runtime.kernels.moe_combine import combine_pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
def test_combine_pairs_sums_the_slots_of_each_token(dtype, with_add, kernel):
    gen = torch.Generator().manual_seed(5)
    T, k, H = 7, 3, 1500  # H not a multiple of the 1024-column block: the masked tail
    partial = randn((T * k, H), gen).to(dtype)
    add = randn((T, H), gen).to(dtype) if with_add else None
    out = combine_pairs(partial, k, add, kernel=kernel)
    ref = partial.float().view(T, k, H).sum(1) + (add.float() if with_add else 0)
    assert out.dtype == dtype and out.shape == (T, H)
    # one rounding of the fp32 sum to BF16: half an ulp on a GPU, one ulp under the CPU interpreter (whose
    # cast truncates)
    rtol = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(out.float(), ref, rtol=rtol, atol=1e-6)
    assert (out.float() - partial.float().view(T, k, H)[:, 0]).abs().max() > 0.1  # slots 1, 2 were added


def test_combine_pairs_of_no_tokens():
    out = combine_pairs(torch.empty((0, 64), device=DEVICE), 3, kernel=True)
    assert out.shape == (0, 64)
