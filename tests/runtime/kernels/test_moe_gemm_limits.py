"""benchmarks/moe_gemm_limits.py builds its diagnostic copies from fp8_gemm_wsp.py's source text: every anchor
must still be there once, so a kernel change that moves one fails here and not on the GPU. Runs anywhere (text
and the blocked layout's index arithmetic; the copies themselves run on Hopper)."""

import pytest
import torch

from benchmarks import moe_gemm_limits as tool


@pytest.mark.parametrize("name", sorted(tool.EDITS))
def test_variant_source_applies_and_parses(name):
    src = tool.variant_source(name)
    compile(src, f"wsp_{name}", "exec")
    assert src != tool.SOURCE.read_text()
    no_mma = name.startswith("loads")
    assert src.count("_k_loop(step, k_tiles, False,") == (2 if no_mma else 0)
    assert ("tma_load(a_desc" in src) == (name not in ("loads_b", "mma"))


def test_blocked_layout_puts_each_block_in_one_run():
    """The row `_load_b_blocked` computes for (weight row r, K offset k) holds W[r, k:k + 128]."""
    E, N, K = 2, 256, 384
    w = torch.arange(E * N * K, dtype=torch.int64).view(E, N, K)
    flat = tool.blocked(w).view(-1, 128)
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        r = int(torch.randint(0, E * N, (1,), generator=rng))
        k = 128 * int(torch.randint(0, K // 128, (1,), generator=rng))
        row = ((r // 128) * (K // 128) + k // 128) * 128 + r % 128
        assert torch.equal(flat[row], w.view(E * N, K)[r, k:k + 128])


def test_a_lost_anchor_is_named(tmp_path, monkeypatch):
    moved = tool.SOURCE.read_text().replace("release(empty.index(s))\n                acc, acc2 = promote(",
                                            "release(empty.index(s))\n                acc, acc2 = promote (")
    (tmp_path / "fp8_gemm_wsp.py").write_text(moved)
    monkeypatch.setattr(tool, "SOURCE", tmp_path / "fp8_gemm_wsp.py")
    with pytest.raises(SystemExit, match="0 copies of 'for kb in range"):
        tool.variant_source("noprom")


def test_wgmma_rows_counts_live_parts_and_drops_short_tails():
    """Two experts' runs (10 and 40 pairs, then 40 and 33) over 64-row parts: every part holding a pair costs
    64 rows; without the parts of fewer than 32 pairs, the 10-pair part goes."""
    pad = 1000
    rows = torch.tensor(list(range(10)) + [pad] * 54 + list(range(10, 50)) + [pad] * 24
                        + list(range(50, 90)) + [pad] * 24 + list(range(90, 123)) + [pad] * 31)
    assert tool.wgmma_rows(rows, 123) == dict(pairs=123, library=256, no_tail=192)
