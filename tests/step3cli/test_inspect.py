"""`step3 inspect`: presets, config.json files and checkpoints; --json, --tensors, --context; errors."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from converters.config import PRESETS
from converters.names import tensor_specs
from step3cli.main import app, main

runner = CliRunner()


def inspect_json(*args: str) -> dict:
    result = runner.invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_step3_preset_counts():
    d = inspect_json("step3")
    assert d["params"]["total"] == pytest.approx(316.3e9, rel=0.005)
    assert 37.5e9 <= d["params"]["active"] <= 39e9
    assert d["params"]["routed_experts"] > 0.9 * d["params"]["total"]
    # STEP3.md: 1 KiB (BF16) / 512 B (FP8) per token per layer, 61 layers
    assert d["kv_bytes_per_token"] == {"bf16": 61 * 1024, "fp8": 61 * 512}
    assert d["kv_bytes_per_sequence"] == {"context": 4096, "bf16": 4096 * 61 * 1024, "fp8": 4096 * 61 * 512}
    assert d["source"] == {"kind": "preset", "path": "step3"}
    assert d["num_tensors"] == len(tensor_specs(PRESETS["step3"])) and d["tensors"] == []
    assert d["storage"]["bytes"] is None and d["storage"]["vision"] is True


def test_context_and_tensor_filter_on_a_preset():
    d = inspect_json("step3", "--context", "32768", "--tensors", r"layers\.4\..*moe\.")
    assert d["kv_bytes_per_sequence"]["bf16"] == 32768 * d["kv_bytes_per_token"]["bf16"]
    assert [t["name"] for t in d["tensors"]] == [f"model.layers.4.moe.{p}.weight"
                                                 for p in ("gate", "gate_proj", "up_proj", "down_proj")]
    assert d["tensors"][1] == {"name": "model.layers.4.moe.gate_proj.weight", "dtype": "bf16",
                               "shape": [48, 5120, 7168], "file": None}


def test_checkpoint_table_comes_from_the_headers(tiny_fp8_ckpt):
    d = inspect_json(str(tiny_fp8_ckpt), "--tensors", r"moe\.gate")
    assert d["source"]["kind"] == "hf" and d["storage"]["fp8"] is True and d["storage"]["files"] == 2
    index = json.loads((tiny_fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    want = sorted(n for n in index if re.search(r"moe\.gate", n))
    assert sorted(t["name"] for t in d["tensors"]) == want
    for row in d["tensors"]:
        assert row["file"] == index[row["name"]]
        with safe_open(tiny_fp8_ckpt / row["file"], "pt") as f:
            t = f.get_tensor(row["name"])
        assert row["shape"] == list(t.shape)
        assert row["dtype"] == {"torch.bfloat16": "BF16", "torch.float8_e4m3fn": "F8_E4M3",
                                "torch.float32": "F32"}[str(t.dtype)]
    assert d["params"]["stored"] == d["params"]["total"]  # scales are not parameters
    shards = [tiny_fp8_ckpt / f for f in set(index.values())]
    data_bytes = [f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in shards]
    assert d["storage"]["bytes"] == sum(data_bytes)


def test_config_json_file(tiny_vision_ckpt):
    d = inspect_json(str(tiny_vision_ckpt / "config.json"))
    assert d["source"]["kind"] == "config" and d["storage"]["vision"] is True
    assert d["params"]["vision"] > 0 and "stored" not in d["params"]


def test_human_output(tiny_ckpt):
    result = runner.invoke(app, ["inspect", str(tiny_ckpt), "--tensors", "lm_head"])
    assert result.exit_code == 0, result.output
    assert "lm_head.weight" in result.stdout and "model-00001-of-00001" in result.stdout
    assert "active per token" in result.stdout and "KV cache (context 4,096)" in result.stdout
    total = PRESETS["step3-tiny"].num_params()["total"]
    assert f"{total:,}" in result.stdout


def test_no_match_is_a_note_not_an_error():
    result = runner.invoke(app, ["inspect", "step3-tiny", "--tensors", "no_such_tensor"])
    assert result.exit_code == 0
    assert "no tensor name matches" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["/no/such/dir"], "/no/such/dir: no such file or directory, and not a preset"),
    (["step3", "--tensors", "(unclosed"], "--tensors '(unclosed': not a valid regular expression"),
])
def test_errors_exit_1_with_a_message(monkeypatch, capsys, args, words):
    monkeypatch.setattr(sys, "argv", ["step3", "inspect", *args])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and words in err and "Traceback" not in err


def test_corrupt_checkpoint_names_the_file(tiny_ckpt, tmp_path, monkeypatch, capsys):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    shard = ckpt / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    monkeypatch.setattr(sys, "argv", ["step3", "inspect", str(ckpt)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "model-00001-of-00001.safetensors" in err


def test_bad_context_is_refused():
    result = runner.invoke(app, ["inspect", "step3", "--context", "0"])
    assert result.exit_code == 2 and "--context" in result.output
