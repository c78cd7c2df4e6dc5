"""1x128 activation quantization vs its torch reference (bit for bit) and the E4M3 rounding rule."""

import pytest
import torch
from ffn_inputs import DEVICE, FP8_ACT_TOL, rel_err

from converters.errors import Step3Error
from runtime.kernels.act_quant import act_dequant, act_quant, act_quant_ref


@pytest.mark.parametrize("shape", [(1, 128), (37, 300), (64, 7 * 128 + 5), (6, 17 * 128 - 60)])
def test_act_quant_matches_reference_bit_for_bit(shape):
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[0])[:, None]
    if shape[0] > 1:
        x[0, :128] = 0.0  # an all-zero group gets scale 1
        x[1, 5] = 1e-30  # far below the group's max: flushes to zero / subnormal
    x = x.to(DEVICE)
    got, want = act_quant(x), act_quant_ref(x)
    assert got.scale_inv.shape == (shape[0], -(-shape[1] // 128))
    assert got.scale_inv.stride() == (1, shape[0])  # outer-dim-major, as torch._scaled_mm wants
    assert torch.equal(got.q.view(torch.uint8).cpu(), want.q.view(torch.uint8).cpu())
    assert torch.equal(got.scale_inv.cpu(), want.scale_inv.cpu())
    err = rel_err(act_dequant(got), x)
    assert 1e-3 < err < FP8_ACT_TOL  # lossy, but within what 3 mantissa bits allow


def test_rounding_is_nearest_even_at_every_e4m3_boundary():
    """Midpoints between neighbouring E4M3 values (and a hair either side) round like torch's cast."""
    codes = torch.arange(0, 127, dtype=torch.uint8)  # all finite non-negative e4m3 values below 448
    values = codes.view(torch.float8_e4m3fn).float()
    mids = (values[:-1] + values[1:]) / 2
    probes = torch.cat([mids, mids * (1 + 2**-20), mids * (1 - 2**-20), values])
    probes = torch.cat([probes, -probes])
    groups = -(-probes.numel() // 127)
    x = torch.zeros(groups * 128)
    x[: probes.numel()] = probes
    x = x.view(groups, 128)
    x[:, 127] = 448.0  # group max 448: scale exactly 1, so the probes are rounded as they are
    got = act_quant(x.to(DEVICE))
    want = x.to(torch.float8_e4m3fn)
    assert torch.equal(got.q.float().cpu(), want.float())
    assert torch.equal(got.scale_inv.cpu(), torch.ones(groups, 1))


def test_act_quant_rejects_non_matrix():
    with pytest.raises(Step3Error, match="row-major"):
        act_quant(torch.randn(4, 8, 128, device=DEVICE))
