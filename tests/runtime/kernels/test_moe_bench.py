"""benchmarks/moe_ffn.py's floor at the sustained FP8 rate: information beside the bar, which keeps the rested
rate. Runs anywhere (arithmetic on a timed row)."""

import pytest

from benchmarks.moe_ffn import at_sustained_rate


def test_floor_at_sustained_rate_takes_the_larger_bound():
    row = dict(flops=2.7e12, bytes=5.6e9, ours_ms=4.7)  # compute-bound at the rested rate
    rested = max(row["flops"] / 1.336e15, row["bytes"] / 4.26e12) * 1e3
    got = at_sustained_rate(row, 1.2e15, 4.26e12)
    assert got["floor_ms_at_sustained_rate"] == pytest.approx(2.7e12 / 1.2e15 * 1e3)
    assert got["floor_ms_at_sustained_rate"] > rested  # a slower rate raises a compute-bound floor
    assert got["fraction_of_floor_at_sustained_rate"] == pytest.approx(2.25 / 4.7)
    memory_bound = at_sustained_rate(dict(flops=1e11, bytes=5.6e9, ours_ms=2.0), 1.2e15, 4.26e12)
    assert memory_bound["floor_ms_at_sustained_rate"] == pytest.approx(5.6e9 / 4.26e12 * 1e3)
