"""`step3 synth`: writes a checkpoint, summarizes it, refuses a non-empty OUT and the full-size preset."""

from __future__ import annotations

import json
import sys

import pytest

from converters.config import Step3Config
from converters.hf import HFCheckpoint
from step3cli.main import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `step3 ARGS` in-process through the real entry point (error boundary included)."""
    monkeypatch.setattr(sys, "argv", ["step3", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_writes_a_valid_checkpoint_and_reports_it(tmp_path, monkeypatch, capsys, tiny_fp8_ckpt):
    out = tmp_path / "ckpt"
    code, stdout, _ = run_cli(monkeypatch, capsys, "synth", str(out), "--fp8", "--shards", "2", "--json")
    assert code == 0
    facts = json.loads(stdout)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert facts["tensors"] == len(index["weight_map"]) and facts["bytes"] == index["metadata"]["total_size"]
    assert facts["shards"] == 2 and facts["dtype"] == "fp8" and facts["preset"] == "step3-tiny"
    assert facts["params"] == Step3Config.from_pretrained(out).num_params()["total_with_vision"]
    HFCheckpoint(out).validate()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):  # same flags
        assert (out / shard).read_bytes() == (tiny_fp8_ckpt / shard).read_bytes()
    code, stdout, _ = run_cli(monkeypatch, capsys, "synth", str(tmp_path / "plain"), "--seed", "3")
    assert code == 0
    assert stdout.startswith(f"wrote {tmp_path / 'plain'}: step3-tiny BF16, 1 shard(s), 77 tensors")


def test_refuses_non_empty_out_without_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, stdout, stderr = run_cli(monkeypatch, capsys, "synth", str(out))
    assert code == 1 and stdout == ""
    assert "Error:" in stderr and "not empty" in stderr and "--force" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, _ = run_cli(monkeypatch, capsys, "synth", str(out), "--force")
    assert code == 0 and (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args,message", [(["--preset", "step3"], "far too large|640 GB"),
                                          (["--preset", "step3-huge"], "unknown preset"),
                                          (["--shards", "100000"], "shards must be between")])
def test_bad_flags_are_clear_errors(tmp_path, monkeypatch, capsys, args, message):
    code, _, stderr = run_cli(monkeypatch, capsys, "synth", str(tmp_path / "x"), *args)
    assert code == 1 and stderr.startswith("Error:")
    assert any(m in stderr for m in message.split("|")), stderr
    assert not (tmp_path / "x" / "config.json").exists()
