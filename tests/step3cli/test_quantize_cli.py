"""`step3 quantize` through the root CLI app: report table, --check, --json, named errors."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from converters.errors import Step3Error
from quant.report import REPORT_FILE
from step3cli.main import app

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, ["quantize", *(str(a) for a in args)], env={"COLUMNS": "200"})


def test_quantize_with_check_prints_report_and_check(tiny_ckpt, tmp_path):
    r = run(tiny_ckpt, tmp_path / "o", "--check", "--backend", "torch", "--kv-cache", "bf16")
    assert r.exit_code == 0, r.output
    for text in ("quantize (hf, backend torch)", "routed_experts", "6/6", "SNR dB", "cosine mean", "pass"):
        assert text in r.stdout, text
    saved = json.loads((tmp_path / "o" / REPORT_FILE).read_text())
    assert saved["check"]["passed"] and saved["check"]["cosine_mean"] >= 0.99
    record = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert record["step3"]["kv_cache_dtype"] == "bf16"
    shown = runner.invoke(app, ["inspect", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "quantization" in shown.stdout and "128x128" in shown.stdout
    assert json.loads(runner.invoke(app, ["inspect", str(tmp_path / "o"), "--json"]).stdout)["quantization"] \
        == record


def test_json_output_on_fp8_input_is_a_passthrough(tiny_fp8_ckpt, tmp_path):
    r = run(tiny_fp8_ckpt, tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["mode"] == "passthrough" and data["backend"] is None and data["kind"] == "hf"
    assert data["total"]["bytes_before"] == data["total"]["bytes_after"]


def test_bad_input_is_a_named_error(tiny_ckpt, tmp_path):
    r = run(tiny_ckpt, tmp_path / "o", "--dequantize")
    assert r.exit_code != 0 and isinstance(r.exception, Step3Error)
    assert "nothing to --dequantize" in str(r.exception)


def test_error_boundary_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "step3cli.main", "quantize", str(tmp_path / "missing"),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Error:" in proc.stderr and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr
