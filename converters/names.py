"""Every tensor of a Step-3 checkpoint: HF name, shape and role, in one table (STEP3.md section 2).

The synthesizer, the validator, the converter, the quantizer and the loaders all loop over
`tensor_specs(cfg)`; nothing else spells a tensor name.

Roles decide where a tensor goes in the AFD layout (DESIGN.md):
- `part`: "attention" (one copy for all DP attention ranks), "ffn" (split over FFN ranks) or "vision".
- `split`: for FFN tensors, how F ranks share it: "ep" (3-D routed experts, contiguous expert ranges on
  dim 0), "tp_out" (gate/up: rows of the intermediate dim, dim 0) or "tp_in" (down: columns, dim 1).
- `quantize`: True for linear weights that FP8 stores as E4M3 + weight_scale_inv.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from converters.config import Step3Config, VisionConfig

Part = Literal["attention", "ffn", "vision"]
Split = Literal["ep", "tp_out", "tp_in"]
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv (step3-fp8 / DeepSeek-V3 block FP8)
FP8_BLOCK = 128
# config.json's quantization_config of a step3-fp8 checkpoint (convert assumes it when an FP8 checkpoint
# has none; synth writes it; step3 quantize starts its record from it).
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    part: Part
    group: str  # report/quantization group: embedding, norm, attention, router, dense_mlp, ...
    quantize: bool = False
    split: Split | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def count_as(self) -> str:
        """Bucket for parameter counts (Step3Config.num_params)."""
        if self.part == "vision":
            return "vision"
        if self.group == "routed_experts":
            return "routed_experts"
        if self.group in ("embedding", "lm_head"):
            return "embedding"
        return "ffn" if self.part == "ffn" else "attention"


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def scale_shape(shape: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, ...]:
    """One float32 scale per block x block tile of the last two dims; leading dims (experts) kept."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block), -(-cols // block))


def _layer_specs(cfg: Step3Config, i: int) -> list[TensorSpec]:
    H, Q, D = cfg.hidden_size, cfg.share_q_dim, cfg.head_dim
    p = f"model.layers.{i}"
    specs = [
        TensorSpec(f"{p}.input_layernorm.weight", (H,), "attention", "norm"),
        TensorSpec(f"{p}.self_attn.q_proj.weight", (Q, H), "attention", "attention", True),
        TensorSpec(f"{p}.self_attn.k_proj.weight", (D, H), "attention", "attention", True),
        TensorSpec(f"{p}.self_attn.v_proj.weight", (D, H), "attention", "attention", True),
        TensorSpec(f"{p}.self_attn.inter_norm.weight", (Q,), "attention", "norm"),
        TensorSpec(f"{p}.self_attn.wq.weight", (cfg.q_dim, Q), "attention", "attention", True),
        TensorSpec(f"{p}.self_attn.o_proj.weight", (H, cfg.q_dim), "attention", "attention", True),
        TensorSpec(f"{p}.post_attention_layernorm.weight", (H,), "attention", "norm"),
    ]
    if cfg.is_moe_layer(i):
        E, Ie, Is = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.share_expert_dim
        specs += [
            TensorSpec(f"{p}.moe.gate.weight", (E, H), "attention", "router"),
            TensorSpec(f"{p}.moe.gate_proj.weight", (E, Ie, H), "ffn", "routed_experts", True, "ep"),
            TensorSpec(f"{p}.moe.up_proj.weight", (E, Ie, H), "ffn", "routed_experts", True, "ep"),
            TensorSpec(f"{p}.moe.down_proj.weight", (E, H, Ie), "ffn", "routed_experts", True, "ep"),
            TensorSpec(f"{p}.share_expert.gate_proj.weight", (Is, H), "ffn", "shared_expert", True, "tp_out"),
            TensorSpec(f"{p}.share_expert.up_proj.weight", (Is, H), "ffn", "shared_expert", True, "tp_out"),
            TensorSpec(f"{p}.share_expert.down_proj.weight", (H, Is), "ffn", "shared_expert", True, "tp_in"),
        ]
    else:
        I = cfg.intermediate_size  # noqa: E741
        specs += [
            TensorSpec(f"{p}.mlp.gate_proj.weight", (I, H), "ffn", "dense_mlp", True, "tp_out"),
            TensorSpec(f"{p}.mlp.up_proj.weight", (I, H), "ffn", "dense_mlp", True, "tp_out"),
            TensorSpec(f"{p}.mlp.down_proj.weight", (H, I), "ffn", "dense_mlp", True, "tp_in"),
        ]
    return specs


def text_tensor_specs(cfg: Step3Config) -> list[TensorSpec]:
    V, H = cfg.vocab_size, cfg.hidden_size
    specs = [TensorSpec("model.embed_tokens.weight", (V, H), "attention", "embedding")]
    for i in range(cfg.num_hidden_layers):
        specs += _layer_specs(cfg, i)
    specs += [
        TensorSpec("model.norm.weight", (H,), "attention", "norm"),
        TensorSpec("lm_head.weight", (V, H), "attention", "lm_head"),
    ]
    return specs


def vision_tensor_specs(v: VisionConfig, text_hidden: int, projector_bias: bool = False) -> list[TensorSpec]:
    """The CLIP-like tower + downsamplers + projector, as vLLM's step3_vl.py names them."""
    Dv, I, O, P = v.hidden_size, v.intermediate_size, v.output_hidden_size, v.patch_size  # noqa: E741
    n_pos = (v.image_size // P) ** 2 + 1
    e = "vision_model.embeddings"
    raw: list[tuple[str, tuple[int, ...]]] = [
        (f"{e}.class_embedding", (Dv,)),
        (f"{e}.patch_embedding.weight", (Dv, v.num_channels, P, P)),
        (f"{e}.patch_embedding.bias", (Dv,)),
        (f"{e}.position_embedding.weight", (n_pos, Dv)),
    ]
    for i in range(v.num_hidden_layers):
        p = f"vision_model.transformer.layers.{i}"
        raw += [
            (f"{p}.self_attn.qkv_proj.weight", (3 * Dv, Dv)), (f"{p}.self_attn.qkv_proj.bias", (3 * Dv,)),
            (f"{p}.self_attn.out_proj.weight", (Dv, Dv)), (f"{p}.self_attn.out_proj.bias", (Dv,)),
            (f"{p}.layer_norm1.weight", (Dv,)), (f"{p}.layer_norm1.bias", (Dv,)),
            (f"{p}.mlp.fc1.weight", (I, Dv)), (f"{p}.mlp.fc1.bias", (I,)),
            (f"{p}.mlp.fc2.weight", (Dv, I)), (f"{p}.mlp.fc2.bias", (Dv,)),
            (f"{p}.layer_norm2.weight", (Dv,)), (f"{p}.layer_norm2.bias", (Dv,)),
        ]
    raw += [
        ("vit_downsampler.weight", (O, Dv, 2, 2)), ("vit_downsampler.bias", (O,)),
        ("vit_downsampler2.weight", (2 * O, O, 3, 3)), ("vit_downsampler2.bias", (2 * O,)),
        ("vit_large_projector.weight", (text_hidden, 2 * O)),
    ]
    if projector_bias:
        raw.append(("vit_large_projector.bias", (text_hidden,)))
    return [TensorSpec(name, shape, "vision", "vision") for name, shape in raw]


def tensor_specs(cfg: Step3Config, vision: bool | None = None) -> list[TensorSpec]:
    """All tensors of the checkpoint; vision ones when the config has a vision tower (or `vision`)."""
    specs = text_tensor_specs(cfg)
    if (cfg.vision is not None) if vision is None else vision:
        assert cfg.vision is not None, "vision tensors asked for, but the config has no vision_config"
        specs += vision_tensor_specs(cfg.vision, cfg.hidden_size, cfg.projector_bias)
    return specs


def spec_table(cfg: Step3Config, vision: bool | None = None) -> dict[str, TensorSpec]:
    return {s.name: s for s in tensor_specs(cfg, vision)}


def name_matcher(pattern: str | None, flag: str) -> Callable[[str], bool]:
    """A predicate on tensor names from a user's regex (searched anywhere in the name); no pattern: none.

    `flag` names the option the pattern came from, so a bad regex is reported against it.
    """
    from converters.errors import Step3Error

    if not pattern:
        return lambda name: False
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise Step3Error(f"{flag} {pattern!r}: not a valid regular expression ({e})") from None
    return lambda name: regex.search(name) is not None


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, lm_head, vision)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None
