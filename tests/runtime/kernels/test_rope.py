"""RoPE kernel vs float64 references (this module's and runtime/model/reference.py's)."""

import pytest
import torch
from paged_inputs import DEVICE, rel_err

from converters.errors import Step3Error
from runtime.kernels.rope import apply_rope, apply_rope_ref, rope_cos_sin_table
from runtime.model import reference

THETA = 500000.0


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    positions = torch.randint(0, 65536, (shape[0],), generator=gen)
    positions[:2] = torch.tensor([0, 65535])  # both ends of the table
    return x, positions.to(DEVICE)


@pytest.mark.parametrize("shape", [(7, 5, 64), (9, 4, 32), (6, 128)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_rope_matches_float64_reference(shape, dtype, tol):
    x, positions = _inputs(shape, dtype, seed=sum(shape))
    table = rope_cos_sin_table(65536, shape[-1], THETA, DEVICE)
    out = apply_rope(x, positions, table)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, apply_rope_ref(x, positions, THETA)) < tol


def test_rope_agrees_with_model_reference_and_runs_in_place():
    x, positions = _inputs((11, 5, 64), torch.float32, seed=3)
    table = rope_cos_sin_table(65536, 64, THETA, DEVICE)
    expected = reference.apply_rope(x.unsqueeze(0).cpu(), positions.cpu(), THETA)[0]
    out = apply_rope(x.clone(), positions, table)
    assert rel_err(out, expected) < 1e-6
    y = x.clone()
    apply_rope(y, positions, table, out=y)
    assert torch.equal(y, out)


def test_rope_table_is_cos_then_sin():
    table = rope_cos_sin_table(4, 8, 10000.0)
    assert torch.equal(table[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert table[3, 0].item() == pytest.approx(float(torch.cos(torch.tensor(3.0, dtype=torch.float64))))


def test_rope_rejects_bad_inputs():
    table = rope_cos_sin_table(16, 64, THETA, DEVICE)
    x = torch.randn(3, 2, 64, device=DEVICE)
    with pytest.raises(Step3Error, match="positions"):
        apply_rope(x, torch.zeros(4, dtype=torch.int64, device=DEVICE), table)
    with pytest.raises(Step3Error, match="table"):
        apply_rope(x, torch.zeros(3, dtype=torch.int64, device=DEVICE), table[:, :32])
    with pytest.raises(Step3Error, match="head_dim"):
        rope_cos_sin_table(16, 63, THETA)
