"""`step3 bench model` through the root CLI app: tables, --json, --plan, --plot, --config, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from converters.config import get_preset
from converters.errors import Step3Error
from step3cli.main import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["bench", "model", *args], env={"COLUMNS": "200"})


def test_default_tables_print_the_papers_figures():
    r = run()
    assert r.exit_code == 0, r.output
    for figure in ("2.56e8", "3.27e10", "2.07e10", "5.33e10", "1.15e9", "5.89e11",  # Tables 2/3
                   "0.048", "0.043", "0.055", "0.068", "0.062", "0.129", "0.211", "0.193",  # Table 6
                   "0.058", "0.007", "0.031", "0.034", "4/49"):  # Table 7
        assert figure in r.output, figure
    assert "H20/A800" in r.output


def test_json_shape():
    r = run("--json", "--context", "4K,8K", "--models", "step3,qwen3-235b-a22b")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    cost = data["tables"]["cost_per_1m_tokens"]
    assert set(cost) == {"step3", "qwen3-235b-a22b"}
    assert set(cost["step3"]["attention"]) == {"4096", "8192"}
    assert set(cost["step3"]["attention"]["8192"]) == {"H800", "H20", "A800", "910B"}
    assert f"{cost['step3']['ffn']['A800']:.3f}" == "0.036"
    assert "assumptions" in data and "plan" not in data


def test_kv_dtype_and_config_change_the_figures(tmp_path):
    base = json.loads(run("--json", "--models", "step3").stdout)["tables"]["per_token"]["step3"]["8192"]
    bf16 = json.loads(run("--json", "--models", "step3", "--kv-dtype", "bf16").stdout)
    assert bf16["tables"]["per_token"]["step3"]["8192"]["kv_bytes"] == 2 * base["kv_bytes"]
    cfg = get_preset("step3").replace(num_attention_heads=32)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    variant = json.loads(run("--json", "--config", str(tmp_path)).stdout)["tables"]["per_token"]["step3"]
    assert variant["8192"]["attention_flops"] * 2 == base["attention_flops"]


def test_plan_shows_the_paper_deployments_and_assumptions():
    r = run("--plan", "--context", "4096", "--tpot-ms", "50", "--attention-hw", "H800", "--ffn-hw", "H800")
    assert r.exit_code == 0, r.output
    for text in ("2A2F", "4A2F", "16A2F", "4,039", "2,643", "898", "a model, not a measurement",
                 "assumption:"):
        assert text in r.output, text
    data = json.loads(run("--plan", "--json", "--context", "8K").stdout)["plan"]
    assert data["context"] == 8192 and len(data["paper_comparison"]) == 3
    assert data["best"][0]["tokens_per_s_per_gpu"] >= data["best"][-1]["tokens_per_s_per_gpu"]


def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "cost.png"
    r = run("--plot", str(png), "--models", "step3,deepseek-v3,qwen3-235b-a22b")
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert not (tmp_path / "cost.png.tmp").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("--hardware", "B200"), "known: H800, H20, A800, 910B, H100, H200"),
    (("--models", "llama"), "known models: step3, deepseek-v3, qwen3-235b-a22b"),
    (("--hardware", "H200"), "--price H200=USD_PER_HOUR"),
    (("--price", "H200"), "NAME=USD_PER_HOUR"),
    (("--context", "8X"), "--context '8X'"),
    (("--kv-dtype", "int4"), "--kv-dtype 'int4'"),
    (("--plot", "cost.jpg"), "must end in .png"),
])
def test_bad_input_is_a_step3error(args, message):
    r = run(*args)
    assert isinstance(r.exception, Step3Error), r.output
    assert message in str(r.exception)
