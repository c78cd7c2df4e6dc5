"""The tensor table (names.py) against the shapes STEP3.md section 2 lists for the real Step-3."""

from __future__ import annotations

from collections import Counter

import pytest

from converters.config import PRESETS, TINY_VISION
from converters.names import (
    is_scale_name,
    layer_of,
    scale_name,
    scale_shape,
    spec_table,
    tensor_specs,
    text_tensor_specs,
    vision_tensor_specs,
)

STEP3 = PRESETS["step3"]
TINY = PRESETS["step3-tiny"]


@pytest.mark.parametrize("cfg", [STEP3, TINY, PRESETS["step3-small"]], ids=["step3", "tiny", "small"])
def test_tensor_counts_per_layer_kind(cfg):
    per_layer = Counter(layer_of(s.name) for s in text_tensor_specs(cfg))
    for i in range(cfg.num_hidden_layers):
        # 8 attention-side tensors, then router + 3 fused experts + 3 shared, or 3 dense MLP tensors
        assert per_layer[i] == (15 if cfg.is_moe_layer(i) else 11), i
    assert per_layer[None] == 3  # embed_tokens, final norm, lm_head
    names = [s.name for s in tensor_specs(cfg)]
    assert len(names) == len(set(names))


def test_step3_total_tensor_count():
    assert len(text_tensor_specs(STEP3)) == 3 + 5 * 11 + 56 * 15
    assert len(tensor_specs(STEP3)) == 3 + 5 * 11 + 56 * 15 + 4 + 63 * 12 + 5
    assert len(tensor_specs(STEP3, vision=False)) == len(text_tensor_specs(STEP3))


STEP3_SHAPES = {
    "model.embed_tokens.weight": (128815, 7168),
    "lm_head.weight": (128815, 7168),
    "model.norm.weight": (7168,),
    "model.layers.0.self_attn.q_proj.weight": (2048, 7168),
    "model.layers.0.self_attn.k_proj.weight": (256, 7168),
    "model.layers.0.self_attn.v_proj.weight": (256, 7168),
    "model.layers.0.self_attn.inter_norm.weight": (2048,),
    "model.layers.0.self_attn.wq.weight": (64 * 256, 2048),
    "model.layers.0.self_attn.o_proj.weight": (7168, 64 * 256),
    "model.layers.0.mlp.gate_proj.weight": (18432, 7168),
    "model.layers.60.mlp.down_proj.weight": (7168, 18432),
    "model.layers.4.moe.gate.weight": (48, 7168),
    "model.layers.4.moe.gate_proj.weight": (48, 5120, 7168),
    "model.layers.59.moe.up_proj.weight": (48, 5120, 7168),
    "model.layers.59.moe.down_proj.weight": (48, 7168, 5120),
    "model.layers.30.share_expert.gate_proj.weight": (5120, 7168),
    "model.layers.30.share_expert.down_proj.weight": (7168, 5120),
    "vision_model.transformer.layers.62.self_attn.qkv_proj.weight": (3 * 1792, 1792),
    "vit_large_projector.weight": (7168, 2 * 4096),
}


def test_step3_shapes():
    table = spec_table(STEP3)
    for name, shape in STEP3_SHAPES.items():
        assert table[name].shape == shape, name
    assert "model.layers.3.moe.gate.weight" not in table and "model.layers.4.mlp.up_proj.weight" not in table


def test_roles():
    for s in tensor_specs(STEP3):
        never = s.group in ("embedding", "lm_head", "norm", "router") or s.part == "vision"
        assert s.quantize is (not never and len(s.shape) >= 2), s.name
        assert (s.split is not None) is (s.part == "ffn"), s.name
        if s.group == "routed_experts":
            assert s.split == "ep" and s.shape[0] == STEP3.moe_num_experts
        elif s.part == "ffn":
            assert s.split == ("tp_in" if s.name.endswith("down_proj.weight") else "tp_out"), s.name


@pytest.mark.parametrize(("shape", "want"), [
    ((7168, 2048), (56, 16)),
    ((48, 5120, 7168), (48, 40, 56)),
    ((320, 192), (3, 2)),  # step3-tiny edge blocks
    ((129, 1), (2, 1)),
    ((128, 128), (1, 1)),
])
def test_scale_shape(shape, want):
    assert scale_shape(shape) == want


def test_scale_names_and_layers():
    assert scale_name("a.weight") == "a.weight_scale_inv" and is_scale_name("a.weight_scale_inv")
    assert not is_scale_name("a.weight")
    assert layer_of("model.layers.17.mlp.up_proj.weight") == 17
    assert layer_of("lm_head.weight") is None
    assert layer_of("vision_model.transformer.layers.3.mlp.fc1.weight") is None


def test_vision_specs_follow_the_config():
    specs = vision_tensor_specs(TINY_VISION, text_hidden=320)
    n_pos = (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2 + 1
    table = {s.name: s.shape for s in specs}
    assert table["vision_model.embeddings.position_embedding.weight"] == (n_pos, TINY_VISION.hidden_size)
    assert table["vit_large_projector.weight"] == (320, 2 * TINY_VISION.output_hidden_size)
    assert "vit_large_projector.bias" in {s.name for s in vision_tensor_specs(TINY_VISION, 320, True)}
