"""Model architectures as data: the few numbers from which the paper's decode quantities follow.

One small frozen dataclass per attention family (MFA, MLA, GQA) answers three questions per layer:
how many values a token leaves in the KV cache, how many FLOPs one query spends per cached token,
and how many projection parameters the layer has. `FFN` answers the same for the feed-forward side.
`Architecture` multiplies them out per decoded token (the paper's Table 2 convention: KV bytes and
attention FLOPs summed over all layers for a context of C cached tokens; linear and FFN FLOPs are
2 x parameters touched; embedding, LM head and MoE router are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from converters.config import Step3Config, get_preset
from converters.errors import Step3Error


@dataclass(frozen=True)
class MFA:
    """Multi-matrix Factorization Attention (Step-3): low-rank query, one K and one V head shared by all."""

    heads: int
    head_dim: int
    q_rank: int  # share_q_dim: hidden -> q_rank -> heads x head_dim
    kv_heads: int = 1
    family: str = "MFA"

    def cached_values(self) -> int:
        return 2 * self.kv_heads * self.head_dim  # K and V

    def flops_per_cached_token(self) -> int:
        return self.heads * 4 * self.head_dim  # q.k and p.v per head: 2 matmuls x 2 FLOP x head_dim

    def params(self, hidden: int) -> int:
        q = hidden * self.q_rank + self.q_rank * self.heads * self.head_dim
        kv = 2 * hidden * self.kv_heads * self.head_dim
        return q + kv + self.heads * self.head_dim * hidden  # + o_proj


@dataclass(frozen=True)
class MLA:
    """Multi-head Latent Attention (DeepSeek-V3), decoded with the up-projections absorbed."""

    heads: int
    q_rank: int
    kv_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    family: str = "MLA"

    def cached_values(self) -> int:
        return self.kv_rank + self.qk_rope_dim  # the shared latent plus the decoupled RoPE key

    def flops_per_cached_token(self) -> int:
        # The paper counts both absorbed matmuls over the full cached width (kv_rank + rope).
        return self.heads * 4 * self.cached_values()

    def params(self, hidden: int) -> int:
        q = hidden * self.q_rank + self.q_rank * self.heads * (self.qk_nope_dim + self.qk_rope_dim)
        kv_down = hidden * (self.kv_rank + self.qk_rope_dim)
        kv_up = self.kv_rank * self.heads * (self.qk_nope_dim + self.v_head_dim)  # absorbed: same size
        return q + kv_down + kv_up + self.heads * self.v_head_dim * hidden


@dataclass(frozen=True)
class GQA:
    """Grouped-query attention: `heads` query heads share `kv_heads` K/V heads."""

    heads: int
    kv_heads: int
    head_dim: int
    family: str = "GQA"

    def cached_values(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def flops_per_cached_token(self) -> int:
        return self.heads * 4 * self.head_dim

    def params(self, hidden: int) -> int:
        return 2 * hidden * self.heads * self.head_dim + 2 * hidden * self.kv_heads * self.head_dim


Attention = MFA | MLA | GQA


@dataclass(frozen=True)
class FFN:
    """Dense SwiGLU layers plus MoE layers (routed top-k of `experts`, plus always-on shared experts)."""

    dense_layers: int
    dense_intermediate: int
    moe_layers: int
    experts: int
    top_k: int
    expert_intermediate: int
    shared_experts: int = 0
    shared_intermediate: int = 0

    def dense_layer_params(self, hidden: int) -> int:
        return 3 * hidden * self.dense_intermediate  # gate, up, down

    def moe_layer_params(self, hidden: int, active: bool) -> int:
        """Routed experts (top-k of them if `active`) plus shared experts of one MoE layer."""
        routed = (self.top_k if active else self.experts) * 3 * hidden * self.expert_intermediate
        return routed + self.shared_experts * 3 * hidden * self.shared_intermediate

    def activated_params(self, hidden: int) -> int:
        return (self.dense_layers * self.dense_layer_params(hidden)
                + self.moe_layers * self.moe_layer_params(hidden, active=True))

    @property
    def sparsity(self) -> float:
        """Activated over total experts, shared included (the paper's S; Step-3: 4/49)."""
        return (self.top_k + self.shared_experts) / (self.experts + self.shared_experts)


@dataclass(frozen=True)
class Architecture:
    """A decoder as the cost model sees it. Quantities are per decoded token."""

    name: str
    hidden: int
    layers: int
    attention: Attention
    ffn: FFN
    source: str = "built-in"

    def __post_init__(self) -> None:
        if self.ffn.dense_layers + self.ffn.moe_layers != self.layers:
            ffn = self.ffn
            raise Step3Error(f"model {self.name!r}: {ffn.dense_layers} dense + {ffn.moe_layers} MoE layers "
                             f"!= {self.layers} layers")

    def kv_bytes(self, context: int, bytes_per_value: int = 1) -> int:
        """KV-cache bytes read per decoded token with `context` cached tokens (the paper: 8-bit, i.e. 1)."""
        return self.layers * self.attention.cached_values() * bytes_per_value * context

    def attention_flops(self, context: int) -> int:
        return self.layers * self.attention.flops_per_cached_token() * context

    def attention_params_per_layer(self) -> int:
        return self.attention.params(self.hidden)

    def linear_flops(self) -> int:
        return 2 * self.layers * self.attention_params_per_layer()

    def ffn_flops(self) -> int:
        return 2 * self.ffn.activated_params(self.hidden)


def from_step3_config(cfg: Step3Config, name: str = "step3") -> Architecture:
    """Step-3 (or any checkpoint's variant) straight from its parsed config.json."""
    attention = MFA(heads=cfg.num_attention_heads, head_dim=cfg.head_dim, q_rank=cfg.share_q_dim,
                    kv_heads=cfg.num_attention_groups)
    ffn = FFN(dense_layers=len(cfg.dense_layers), dense_intermediate=cfg.intermediate_size,
              moe_layers=len(cfg.moe_layers), experts=cfg.moe_num_experts, top_k=cfg.moe_top_k,
              expert_intermediate=cfg.moe_intermediate_size, shared_experts=1,
              shared_intermediate=cfg.share_expert_dim)
    return Architecture(name=name, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, attention=attention,
                        ffn=ffn, source=cfg.source)


# DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3): 3 dense + 58 MoE layers.
DEEPSEEK_V3 = Architecture(
    name="deepseek-v3", hidden=7168, layers=61,
    attention=MLA(heads=128, q_rank=1536, kv_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_head_dim=128),
    ffn=FFN(dense_layers=3, dense_intermediate=18432, moe_layers=58, experts=256, top_k=8,
            expert_intermediate=2048, shared_experts=1, shared_intermediate=2048),
    source="deepseek-ai/DeepSeek-V3 config.json",
)

# Qwen3-235B-A22B (config.json of Qwen/Qwen3-235B-A22B): every layer MoE, no shared expert.
QWEN3_235B = Architecture(
    name="qwen3-235b-a22b", hidden=4096, layers=94,
    attention=GQA(heads=64, kv_heads=4, head_dim=128),
    ffn=FFN(dense_layers=0, dense_intermediate=0, moe_layers=94, experts=128, top_k=8,
            expert_intermediate=1536),
    source="Qwen/Qwen3-235B-A22B config.json",
)


def known_models() -> dict[str, Architecture]:
    return {"step3": from_step3_config(get_preset("step3")), DEEPSEEK_V3.name: DEEPSEEK_V3,
            QWEN3_235B.name: QWEN3_235B}


def get_model(name: str) -> Architecture:
    models = known_models()
    key = name.strip().lower()
    if key not in models:
        raise Step3Error(f"unknown model {name!r} in --models; known models: {', '.join(models)}")
    return models[key]
