"""benchmarks/mfa_cta_trace.py builds its traced kernel from mfa_decode_ws.py's source text: every anchor must
still be there, as often as expected, so a kernel change that moves one fails here and not on the GPU.
Runs anywhere (text only; the traced kernel itself runs on Hopper)."""

import pytest

from benchmarks import mfa_cta_trace as tool


@pytest.mark.parametrize("waits", [None, "consumer", "converter"])
def test_traced_source_applies_and_parses(waits):
    src = tool.traced_source(waits)
    compile(src, "mfa_decode_ws_traced", "exec")
    assert src.count("gl.store(tr + ") == 13  # timeline slots 0-8, 12, 13 (or 18), 16 and 17
    assert src.count("_acc(tr, 1") == (0 if waits is None else 2)  # wait counters, slots 10-15
    assert "trace_ptr=trace" in src and "trace_ptr)" in src  # the launch and the kernel take the buffer


def test_a_lost_anchor_is_named(tmp_path, monkeypatch):
    moved = tool.SOURCE.read_text().replace("    b = gl.program_id(1)\n", "    b = gl.program_id(axis=1)\n")
    (tmp_path / "mfa_decode_ws.py").write_text(moved)
    monkeypatch.setattr(tool, "SOURCE", tmp_path / "mfa_decode_ws.py")
    with pytest.raises(SystemExit, match=r"0 copies of 'b = gl.program_id\(1\)'"):
        tool.traced_source()
