"""Step3Config: parsing the real config.json forms, derived counts, validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.config import PRESETS, Step3Config, VisionConfig, get_preset, load_config
from converters.errors import ConfigError, Step3Error

STEP3 = PRESETS["step3"]


def real_config_json() -> dict:
    """config.json as STEP3.md section 1 describes the published checkpoint, written out by hand."""
    return {
        "model_type": "step3_vl",
        "architectures": ["Step3VLForConditionalGeneration"],
        "image_token_id": 128001,
        "understand_projector_stride": 2,
        "projector_bias": False,
        "text_config": {
            "model_type": "step3_text", "architectures": ["Step3TextForCausalLM"],
            "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 64,
            "num_attention_groups": 1, "head_dim": 256, "share_q_dim": 2048, "intermediate_size": 18432,
            "moe_layers_enum": ",".join(str(i) for i in range(4, 60)), "moe_num_experts": 48, "moe_top_k": 3,
            "moe_intermediate_size": 5120, "share_expert_dim": 5120, "norm_expert_weight": False,
            "vocab_size": 128815, "rope_theta": 500000, "max_position_embedding": 65536,
            "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "step3_vision_encoder", "hidden_size": 1792, "num_hidden_layers": 63,
            "num_attention_heads": 16, "patch_size": 14, "image_size": 728, "hidden_act": "quick_gelu",
            "output_hidden_size": 4096, "layer_norm_eps": 1e-5,
        },
    }


# ---- parsing ---------------------------------------------------------------------------------------
def test_real_config_parses_to_the_step3_preset():
    cfg = Step3Config.from_hf_dict(real_config_json())
    assert cfg == STEP3
    assert cfg.moe_layers == tuple(range(4, 60))
    assert cfg.dense_layers == (0, 1, 2, 3, 60)
    assert cfg.vision is not None and cfg.vision.num_hidden_layers == 63


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_round_trips_through_json(name):
    cfg = PRESETS[name]
    back = Step3Config.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back == cfg
    assert back.moe_layers == cfg.moe_layers


def test_bare_step3_text_dict():
    text = real_config_json()["text_config"]
    cfg = Step3Config.from_hf_dict(text)
    assert cfg.vision is None
    assert cfg == STEP3.replace(vision=None)


def test_plural_max_position_embeddings_alias():
    text = real_config_json()["text_config"]
    text["max_position_embeddings"] = text.pop("max_position_embedding") // 2
    assert Step3Config.from_hf_dict(text).max_position_embedding == 32768


def test_absent_moe_layers_enum_means_layers_1_to_last():
    text = real_config_json()["text_config"]
    del text["moe_layers_enum"]
    cfg = Step3Config.from_hf_dict(text)
    assert cfg.moe_layers == tuple(range(1, 61)) and cfg.dense_layers == (0,)
    assert "moe_layers_enum" not in cfg.to_hf_dict()["text_config"]


def test_from_pretrained_reads_dir_and_file(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(real_config_json()))
    assert Step3Config.from_pretrained(tmp_path) == STEP3
    assert load_config(tmp_path / "config.json") == STEP3
    assert load_config("step3-tiny") is PRESETS["step3-tiny"]


# ---- derived facts, checked against formulas written from STEP3.md -----------------------------------
def test_parameter_counts_match_the_paper():
    counts = STEP3.num_params()
    assert counts["total"] == pytest.approx(316.3e9, rel=0.005)
    assert 37.5e9 <= STEP3.num_active_params() <= 39e9
    assert counts["total"] == sum(counts[k] for k in ("attention", "ffn", "routed_experts", "embedding"))


def test_parameter_counts_by_formula():
    """Each bucket recomputed by hand from the shapes in STEP3.md section 2 (not from names.py)."""
    c = STEP3
    H, Q, D, heads, L = c.hidden_size, c.share_q_dim, c.head_dim, c.num_attention_heads, c.num_hidden_layers
    E, Ie, Is, Id, V = (c.moe_num_experts, c.moe_intermediate_size, c.share_expert_dim, c.intermediate_size,
                        c.vocab_size)
    n_moe = 56
    attn_layer = Q * H + 2 * D * H + Q + heads * D * Q + H * heads * D + 2 * H
    router = E * H
    counts = STEP3.num_params()
    assert counts["attention"] == L * attn_layer + n_moe * router + H  # + final norm
    assert counts["routed_experts"] == n_moe * 3 * E * Ie * H
    assert counts["ffn"] == n_moe * 3 * Is * H + (L - n_moe) * 3 * Id * H
    assert counts["embedding"] == 2 * V * H
    active = counts["total"] - counts["routed_experts"] + n_moe * 3 * c.moe_top_k * Ie * H
    assert STEP3.num_active_params() == active


def test_kv_bytes_per_token():
    # STEP3.md: 2 x 256 values per token per layer, 1 KiB in BF16, 512 B in FP8.
    assert STEP3.kv_bytes_per_token("bf16") == 61 * 1024
    assert STEP3.kv_bytes_per_token("fp8") == 61 * 512
    with pytest.raises(ConfigError, match="fp4"):
        STEP3.kv_bytes_per_token("fp4")


# ---- validation errors name the field ----------------------------------------------------------------
BAD_TEXT_VALUES = [
    ("hidden_size", "7168", "hidden_size"),
    ("hidden_size", 7168.0, "hidden_size"),
    ("hidden_size", True, "hidden_size"),
    ("num_hidden_layers", 0, "num_hidden_layers"),
    ("vocab_size", -5, "vocab_size"),
    ("moe_num_experts", None, "moe_num_experts"),
    ("share_q_dim", [2048], "share_q_dim"),
    ("num_attention_groups", 8, "num_attention_groups"),
    ("head_dim", 255, "head_dim"),
    ("moe_top_k", 49, "moe_top_k"),
    ("rope_theta", -1.0, "rope_theta"),
    ("rope_theta", "500000", "rope_theta"),
    ("rms_norm_eps", 2.0, "rms_norm_eps"),
    ("moe_layers_enum", "4,five,6", "moe_layers_enum"),
    ("moe_layers_enum", "4,61", "moe_layers_enum"),
    ("moe_layers_enum", "-1,4", "moe_layers_enum"),
    ("moe_layers_enum", "4,4,5", "moe_layers_enum"),
    ("moe_layers_enum", [4, 5], "moe_layers_enum"),
    ("max_position_embedding", "65536", "max_position_embedding"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_TEXT_VALUES)
def test_bad_text_value_names_the_field(field, value, named):
    d = real_config_json()
    d["text_config"][field] = value
    with pytest.raises(ConfigError, match=named) as e:
        Step3Config.from_hf_dict(d, source="ckpt/config.json")
    assert "ckpt/config.json" in str(e.value)


@pytest.mark.parametrize("field", ["hidden_size", "moe_num_experts", "vocab_size", "share_q_dim"])
def test_missing_field_is_named(field):
    d = real_config_json()
    del d["text_config"][field]
    with pytest.raises(ConfigError, match=rf"missing field\(s\) text_config\.{field}"):
        Step3Config.from_hf_dict(d)


@pytest.mark.parametrize(("d", "named"), [
    ([1, 2], "JSON object"),
    ({"text_config": "nope"}, "text_config"),
    ({**real_config_json(), "vision_config": [1]}, "vision_config"),
])
def test_bad_structure(d, named):
    with pytest.raises(ConfigError, match=named):
        Step3Config.from_hf_dict(d)


def test_config_errors_are_step3_errors(tmp_path: Path):
    with pytest.raises(Step3Error, match="not found"):
        Step3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Step3Config.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("step4")
    with pytest.raises(ConfigError, match="not a preset"):
        load_config(tmp_path / "missing")


def test_unknown_vision_fields_are_ignored():
    d = real_config_json()
    d["vision_config"]["some_future_field"] = 1
    assert Step3Config.from_hf_dict(d).vision == VisionConfig()


@pytest.mark.parametrize(("field", "value"), [("hidden_size", None), ("patch_size", 0),
                                              ("num_hidden_layers", "63"), ("image_size", 728.0)])
def test_bad_vision_value_names_the_field(field, value):
    d = real_config_json()
    d["vision_config"][field] = value
    want = rf"ckpt/config.json: bad vision_config: field 'vision_config\.{field}'"
    with pytest.raises(ConfigError, match=want):
        Step3Config.from_hf_dict(d, source="ckpt/config.json")
