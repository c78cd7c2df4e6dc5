"""The paper's Tables 2, 3, 6 and 7 reproduced from architectures and hardware, digit for digit.

Expected values are the figures printed in arXiv 2507.19427 (and quoted in the issue/STEP3.md); the code
under test computes them from dimensions and rates only.
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from converters.config import get_preset
from converters.errors import Step3Error
from converters.names import tensor_specs
from runtime.bench.architectures import FFN, GQA, Architecture, from_step3_config, get_model, known_models
from runtime.bench.cost_model import cost_report, min_sparsity, per_token
from runtime.bench.hardware import PAPER_HARDWARE, load_hardware_file, resolve_hardware

PAPER = list(PAPER_HARDWARE.values())
MODELS = ["step3", "deepseek-v3", "qwen3-235b-a22b"]


def sig3(x: float) -> str:
    """3 significant digits, the way the paper prints Table 2/3 (2.56E+08)."""
    return f"{x:.2e}"


@pytest.fixture(scope="module")
def report():
    return cost_report([get_model(m) for m in MODELS], [8192, 32768], PAPER)


# Table 2 (8K) and Table 3 (32K): KV bytes (8-bit), attention FLOPs, linear FLOPs, FFN FLOPs, FLOP/byte.
TABLE_2_3 = {
    ("step3", 8192): ("2.56e+08", "3.27e+10", "2.07e+10", "5.33e+10", 128),
    ("deepseek-v3", 8192): ("2.88e+08", "1.47e+11", "2.28e+10", "4.84e+10", 512),
    ("qwen3-235b-a22b", 8192): ("7.89e+08", "2.52e+10", "1.34e+10", "2.84e+10", 32),
    ("step3", 32768): ("1.02e+09", "1.31e+11", "2.07e+10", "5.33e+10", 128),
    ("deepseek-v3", 32768): ("1.15e+09", "5.89e+11", "2.28e+10", "4.84e+10", 512),
    ("qwen3-235b-a22b", 32768): ("3.15e+09", "1.01e+11", "1.34e+10", "2.84e+10", 32),
}


@pytest.mark.parametrize(("model", "context"), list(TABLE_2_3))
def test_tables_2_and_3_per_token(report, model, context):
    p = report.per_token[model][context]
    kv, attn, linear, ffn, intensity = TABLE_2_3[model, context]
    assert (sig3(p.kv_bytes), sig3(p.attention_flops), sig3(p.linear_flops), sig3(p.ffn_flops)) == \
        (kv, attn, linear, ffn)
    assert p.arithmetic_intensity == intensity


def test_table_6_step3_per_accelerator(report):
    att = report.attention_usd["step3"][8192]
    ffn = report.ffn_usd["step3"]
    assert [f"{att[h]:.3f}" for h in ("H800", "H20", "A800", "910B")] == ["0.048", "0.040", "0.040", "0.043"]
    assert [f"{ffn[h]:.3f}" for h in ("H800", "H20", "A800", "910B")] == ["0.015", "0.040", "0.036", "0.035"]


@pytest.mark.parametrize(("model", "context", "total"), [
    ("step3", 8192, "0.055"), ("deepseek-v3", 8192, "0.068"), ("qwen3-235b-a22b", 8192, "0.062"),
    ("step3", 32768, "0.129"), ("deepseek-v3", 32768, "0.211"), ("qwen3-235b-a22b", 32768, "0.193"),
])
def test_table_6_cheapest_afd_totals(report, model, context, total):
    assert f"{report.pairings[model][context].total_usd:.3f}" == total


def test_cheapest_pairing_names_the_papers_hardware(report):
    p = report.pairings["step3"][8192]
    assert set(p.attention_hw) == {"H20", "A800"} and p.ffn_hw == ("H800",)  # "H20/A800 + H800"
    assert report.pairings["deepseek-v3"][8192].attention_hw == ("H800",)  # MLA is compute-heavy
    assert report.pairings["qwen3-235b-a22b"][32768].attention_hw == ("H20",)  # GQA is memory-heavy


def test_table_7_min_sparsity():
    step3 = get_model("step3")
    got = [f"{min_sparsity(step3, h):.3f}" for h in PAPER]
    assert got == ["0.058", "0.007", "0.031", "0.034"]
    assert step3.ffn.sparsity == pytest.approx(4 / 49)
    assert get_model("deepseek-v3").ffn.sparsity == pytest.approx(9 / 257)


def test_unit_costs_are_price_per_second_over_rate(report):
    h800 = report.unit_costs["H800"]
    assert h800.usd_per_flop == pytest.approx(2 / 3600 / 1.98e15)
    assert h800.usd_per_byte == pytest.approx(2 / 3600 / 3.35e12)


def test_step3_follows_its_tensor_table():
    """Linear and FFN FLOPs agree with converters/names.py, an independent count of the same config."""
    cfg = get_preset("step3")
    arch = from_step3_config(cfg)
    proj = re.compile(r"self_attn\.(q_proj|k_proj|v_proj|wq|o_proj)\.weight$")
    assert arch.linear_flops() == 2 * sum(s.numel for s in tensor_specs(cfg) if proj.search(s.name))
    counts = cfg.num_params()
    routed_active = counts["routed_experts"] * cfg.moe_top_k // cfg.moe_num_experts
    assert arch.ffn_flops() == 2 * (counts["ffn"] + routed_active)
    for dtype, width in (("bf16", 2), ("fp8", 1)):
        assert arch.kv_bytes(8192, width) == cfg.kv_bytes_per_token(dtype) * 8192


def test_step3_figures_follow_the_config():
    base_cfg = get_preset("step3")
    base = per_token(from_step3_config(base_cfg), 8192)
    half = per_token(from_step3_config(base_cfg.replace(num_attention_heads=32)), 8192)
    assert half.attention_flops * 2 == base.attention_flops  # 4 x heads x head_dim per cached token
    assert half.kv_bytes == base.kv_bytes  # one shared K/V head, whatever the query heads
    h, q, d, L = 7168, 2048, 256, 61  # wq and o_proj shrink by 32 heads x 256
    assert base.linear_flops - half.linear_flops == 2 * L * (q * 32 * d + 32 * d * h)
    bf16 = per_token(from_step3_config(base_cfg), 8192, kv_bytes_per_value=2)
    assert bf16.kv_bytes == 2 * base.kv_bytes and bf16.arithmetic_intensity == 64
    fewer_moe = from_step3_config(base_cfg.replace(moe_layers_enum="4,5"))
    assert fewer_moe.ffn.moe_layers == 2 and fewer_moe.ffn.dense_layers == 59


def test_bf16_kv_raises_memory_bound_attention_cost():
    step3 = get_model("step3")
    fp8 = cost_report([step3], [8192], PAPER, kv_bytes_per_value=1).attention_usd["step3"][8192]
    bf16 = cost_report([step3], [8192], PAPER, kv_bytes_per_value=2).attention_usd["step3"][8192]
    assert all(bf16[h] > fp8[h] for h in ("H800", "A800", "910B"))  # memory-bound there
    assert bf16["H800"] == pytest.approx(fp8["H800"] + 2.558e8 / 3.35e12 * 2 / 3600 * 1e6, rel=1e-3)


def test_json_shape(report):
    data = json.loads(json.dumps(report.to_json()))
    cost = data["tables"]["cost_per_1m_tokens"]
    assert set(cost) == set(MODELS)
    assert round(cost["step3"]["attention"]["8192"]["H800"], 3) == 0.048
    assert round(cost["step3"]["ffn"]["H800"], 3) == 0.015
    assert data["tables"]["min_moe_sparsity"]["step3"]["H20"] < 0.01


def test_unknown_names_list_the_known():
    with pytest.raises(Step3Error, match="known models: step3, deepseek-v3, qwen3-235b-a22b"):
        get_model("llama")
    with pytest.raises(Step3Error, match=r"unknown accelerator 'B200'.*H800, H20, A800, 910B, H100, H200"):
        resolve_hardware(["B200"])
    with pytest.raises(Step3Error, match=r"--price H200="):
        cost_report([get_model("step3")], [8192], resolve_hardware(["H200"]))


def test_datasheet_hardware_takes_a_user_price():
    (h200,) = resolve_hardware(["h200"], prices={"H200": 3.6})
    r = cost_report([get_model("step3")], [8192], [h200])
    # memory-bound: KV 2.56e8 B at 4.8 TB/s plus linear FLOPs at 1979 TFLOP/s, at $3.6/h
    expected = (2.558e8 / 4.8e12 + 2.066e10 / 1.979e15) * 3.6 / 3600 * 1e6
    assert r.attention_usd["step3"][8192]["H200"] == pytest.approx(expected, rel=1e-3)


def test_user_hardware_from_toml_and_json(tmp_path):
    toml = tmp_path / "hw.toml"
    toml.write_text('[accelerators.Mine]\nusd_per_hour = 1.0\ntflops = 500\nmemory_tbps = 2.5\n'
                    'network_gbps = 200\nmemory_gb = 64\n')
    mine = load_hardware_file(toml)["Mine"]
    assert (mine.flops, mine.memory_bw, mine.memory_bytes) == (5e14, 2.5e12, 64e9)
    assert mine.server_network_bw == 8 * 200e9 / 8
    js = tmp_path / "hw.json"
    js.write_text(json.dumps({"accelerators": {"Other": {"usd_per_hour": 2, "tflops": 100, "memory_tbps": 1,
                                                          "network_gbps": 100}}}))
    (other,) = resolve_hardware(["other"], extra=load_hardware_file(js))
    assert other.name == "Other" and other.usd_per_hour == 2
    js.write_text(json.dumps({"accelerators": {"Bad": {"usd_per_hour": 2, "tflops": -1, "memory_tbps": 1,
                                                        "network_gbps": 100}}}))
    with pytest.raises(Step3Error, match="accelerators.Bad: field 'tflops' must be a positive number"):
        load_hardware_file(js)
    js.write_text(json.dumps({"accelerators": {"Bad": {"usd_per_hour": 2}}}))
    with pytest.raises(Step3Error, match="missing field"):
        load_hardware_file(js)


def test_architecture_checks_its_layer_count():
    with pytest.raises(Step3Error, match="layers"):
        Architecture("x", 64, 3, GQA(4, 1, 16), FFN(1, 128, 1, 4, 2, 32))
    assert set(known_models()) == set(MODELS)


def test_toml_without_tomllib_says_use_json(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the error names the file and the JSON alternative."""
    toml = tmp_path / "hw.toml"
    toml.write_text("[accelerators.X]\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)
    with pytest.raises(Step3Error, match=r"hw\.toml: reading TOML needs Python 3\.11\+.*JSON"):
        load_hardware_file(toml)
