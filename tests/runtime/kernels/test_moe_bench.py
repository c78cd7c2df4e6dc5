"""benchmarks/moe_ffn.py's floor at the rested FP8 rate: information beside the bar, whose floor takes the
sustained rate; and the clock sampler of benchmarks/common.py. Runs anywhere (arithmetic on a timed row, a
faked nvidia-smi)."""

import pytest

from benchmarks.moe_ffn import at_rested_rate


def test_floor_at_rested_rate_takes_the_larger_bound():
    row = dict(flops=2.7e12, bytes=5.6e9, ours_ms=4.7)  # compute-bound at both rates
    sustained = max(row["flops"] / 1.12e15, row["bytes"] / 4.26e12) * 1e3
    got = at_rested_rate(row, 1.35e15, 4.26e12)
    assert got["floor_ms_at_rested_rate"] == pytest.approx(2.7e12 / 1.35e15 * 1e3)
    assert got["floor_ms_at_rested_rate"] < sustained  # a faster rate lowers a compute-bound floor
    assert got["fraction_of_floor_at_rested_rate"] == pytest.approx(2.0 / 4.7)
    memory_bound = at_rested_rate(dict(flops=1e11, bytes=5.6e9, ours_ms=2.0), 1.35e15, 4.26e12)
    assert memory_bound["floor_ms_at_rested_rate"] == pytest.approx(5.6e9 / 4.26e12 * 1e3)



def test_the_floor_takes_the_rate_under_load(monkeypatch):
    """fp8_matmul_rates with the GEMM and CUDA timing faked: the floor's rate (first) is the one timed after
    the load, the rows' clock state; the rested one comes second, for information."""
    from benchmarks import moe_ffn

    monkeypatch.setattr(moe_ffn, "rate_gemm", lambda gen: lambda: None)
    monkeypatch.setattr(moe_ffn, "time_ms", lambda fn, reps: 0.8)  # rested: boost clock
    monkeypatch.setattr(moe_ffn, "event_median_ms", lambda fn, reps: 1.0)  # loaded: the power cap's clock
    floor_rate, rested = moe_ffn.fp8_matmul_rates(None)
    assert floor_rate == pytest.approx(2 * moe_ffn.RATE_N**3 / 1e-3)
    assert rested == pytest.approx(2 * moe_ffn.RATE_N**3 / 0.8e-3)

def test_clocks_under_load_reads_the_settled_samples(monkeypatch):
    """benchmarks/common.clocks_under_load with nvidia-smi and CUDA faked: the medians come from the last two
    thirds of the samples (the first third holds the idle start), `before` runs first, every call counts."""
    import subprocess

    import torch

    from benchmarks import common

    lines = ["345, 80.1"] * 4 + ["1980, 420.0"] * 2 + ["1400, 690.0", "1410, 688.0", "1395, 692.0"] * 2

    class FakeSmi:
        def __init__(self, cmd, **kw):
            assert "clocks.sm,power.draw" in " ".join(cmd)

        def terminate(self):
            pass

        def communicate(self):
            return "\n".join(lines) + "\nno data\n", ""

    monkeypatch.setattr(subprocess, "Popen", FakeSmi)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    order = []
    got = common.clocks_under_load({"a": lambda: order.append("a")}, {"a": lambda: order.append("before")},
                                   seconds=0.01)
    assert order[0] == "before" and set(order[1:]) == {"a"}
    row = got["a"]
    assert row["calls"] == len(order) - 1 and row["samples"] == 8  # 12 samples, the first 4 dropped
    assert row["sm_mhz"] == 1405.0 and row["watts"] == 689.0  # medians of the 8 kept (2 still at boost)
    assert row["ms_per_call"] > 0
