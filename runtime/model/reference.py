"""The Step-3 text decoder in plain eager PyTorch: the oracle every fast path is tested against.

Written to be read top to bottom (STEP3.md section 3, checked against vLLM's `step3_text.py`):
RMSNorm -> RoPE -> MFA attention -> MLP / MoE -> decoder layer -> model -> greedy generation.
Clarity and exactness beat speed: no fused kernels, no paging, one shared K and V head per layer.
Numerics: weights and matmuls in the model's dtype (fp32 by default); RMSNorm, RoPE (angles in float64),
attention softmax, router softmax/top-k and the weighted expert sum always in fp32.

The pieces are plain functions on tensors so kernel tests can use them as their torch reference:
    rmsnorm(x [..., N], weight [N], eps)                                  -> [..., N]
    apply_rope(x [B, T, ..., D], positions [T], theta)                    -> [B, T, ..., D]
    mfa_attention(q [B, T, heads, D], k [B, S, D], v [B, S, D])           -> [B, T, heads, D]
    mlp(x [..., H], gate_proj [I, H], up_proj [I, H], down_proj [H, I])   -> [..., H]
    route(x [N, H], router [E, H], top_k, norm_expert_weight)             -> weights [N, k] fp32, ids [N, k]
    routed_experts(x [N, H], weights, ids, gate_proj [E, Ie, H], up_proj, down_proj [E, H, Ie]) -> [N, H]
    moe(x [N, H], router, gate_proj, up_proj, down_proj, top_k, norm_expert_weight)  -> [N, H] (routed only)
The modules below hold the parameters under exactly the HF checkpoint names (converters/names.py), so
loading (sources in runtime/model/loading.py) is one loop over the tensor table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from converters.config import Step3Config
from converters.errors import CheckpointError, Step3Error
from converters.names import text_tensor_specs
from runtime.model.loading import TensorDict, WeightSource, open_weights

ProgressFn = Callable[[int, int, str], None]  # (done_bytes, total_bytes, label), as step3cli/render renders


# ---- the pieces, as functions ------------------------------------------------------------------
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps), computed in fp32 (no `1 + w`: Step-3 stores the scale itself)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.float() * normed).to(x.dtype)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding over all D dims: x * cos + rotate_half(x) * sin, in fp32.

    x is [B, T, ..., D] (k: [B, T, D]; q: [B, T, heads, D]); positions [T] are absolute token positions.
    Dim i and i + D/2 form one rotating pair with frequency theta^(-2i/D).
    """
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float64) / D))  # [D/2]
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    shape = (angles.shape[0],) + (1,) * (x.dim() - 3) + (D,)  # [T, 1.., D]: broadcast over heads
    cos, sin = angles.cos().float().view(shape), angles.sin().float().view(shape)
    x32 = x.float()
    x1, x2 = x32[..., : D // 2], x32[..., D // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half
    return (x32 * cos + rotated * sin).to(x.dtype)


def mfa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-matrix factorization attention core: every query head attends to the ONE shared K/V head.

    q [B, T, heads, D] are the LAST T of the S positions that k, v [B, S, D] cover (S = T for a full
    forward, S = cached + T when decoding), so query t may see keys 0 .. S - T + t (causal).
    softmax(q k^T / sqrt(D)) v in fp32 -> [B, T, heads, D] in q's dtype.
    """
    T, S, D = q.shape[1], k.shape[1], q.shape[-1]
    scores = torch.einsum("bthd,bsd->bhts", q.float(), k.float()) * D**-0.5  # [B, heads, T, S]
    query_pos = torch.arange(S - T, S, device=q.device)[:, None]  # [T, 1]
    key_pos = torch.arange(S, device=q.device)[None, :]  # [1, S]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = scores.softmax(dim=-1)  # [B, heads, T, S]
    return torch.einsum("bhts,bsd->bthd", probs, v.float()).to(q.dtype)  # [B, T, heads, D]


def mlp(x: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
        down_proj: torch.Tensor) -> torch.Tensor:
    """SwiGLU: down(silu(gate x) * up x). Used by dense layers, the shared expert and each routed expert."""
    return F.linear(F.silu(F.linear(x, gate_proj)) * F.linear(x, up_proj), down_proj)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int,
          norm_expert_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all E router logits (fp32), then top-k: -> (weights [N, k] fp32, ids [N, k] int64).

    Renormalize the k weights to sum to 1 only if `norm_expert_weight` (false for Step-3);
    no routed scaling factor.
    """
    probs = F.linear(x.float(), router.float()).softmax(dim=-1)  # [N, E]
    weights, ids = probs.topk(top_k, dim=-1)  # [N, k] each
    if norm_expert_weight:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def routed_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_proj: torch.Tensor,
                   up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{ids[n, j]}(x[n]), expert by expert; accumulated in fp32.

    x [N, H]; gate_proj, up_proj [E, Ie, H]; down_proj [E, H, Ie] (the fused HF layout).
    An expert id outside 0..E-1 is a bug in the caller, so it trips an assert.
    """
    assert ids.min() >= 0 and ids.max() < gate_proj.shape[0], "expert id out of range"
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [N, H]
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)  # the tokens that picked expert e
        y = mlp(x[token], gate_proj[e], up_proj[e], down_proj[e])  # [n_e, H]
        out.index_add_(0, token, y.float() * weights[token, slot, None])
    return out.to(x.dtype)


def moe(x: torch.Tensor, router: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
        down_proj: torch.Tensor, top_k: int, norm_expert_weight: bool) -> torch.Tensor:
    """The routed part of a Step-3 MoE layer (the shared expert is added by the decoder layer)."""
    weights, ids = route(x, router, top_k, norm_expert_weight)
    return routed_experts(x, weights, ids, gate_proj, up_proj, down_proj)


# ---- the KV cache ------------------------------------------------------------------------------
class KVCache:
    """Per layer one K and one V tensor [B, max_len, D] (MFA: one shared head), filled left to right."""

    def __init__(self, cfg: Step3Config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0  # tokens cached so far (the same in every layer once a forward finishes)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, T, D] after the cached tokens; return all of them so far, [B, length + T, D]."""
        end = self.length + k.shape[1]
        if end > self.k[layer].shape[1]:
            raise Step3Error(f"KV cache holds {self.k[layer].shape[1]} tokens; {end} needed")
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


# ---- the modules (parameter names = HF checkpoint names) ---------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)


class Stacked(nn.Module):
    """A 3-D [E, out, in] weight: the routed experts of one MoE layer, stored fused as in HF."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))


def _linear(inp: int, out: int) -> nn.Linear:
    return nn.Linear(inp, out, bias=False)


class Attention(nn.Module):
    """MFA: low-rank query (q_proj -> inter_norm -> wq) for all heads, one shared K and V head."""

    def __init__(self, cfg: Step3Config):
        super().__init__()
        H, Q, D = cfg.hidden_size, cfg.share_q_dim, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = _linear(H, Q), _linear(H, D), _linear(H, D)
        self.inter_norm = RMSNorm(Q, cfg.rms_norm_eps)
        self.wq, self.o_proj = _linear(Q, cfg.q_dim), _linear(cfg.q_dim, H)
        self.heads, self.head_dim, self.theta = cfg.num_attention_heads, D, cfg.rope_theta

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        B, T, _ = h.shape
        q = self.wq(self.inter_norm(self.q_proj(h))).view(B, T, self.heads, self.head_dim)  # [B, T, heads, D]
        k, v = self.k_proj(h), self.v_proj(h)  # [B, T, D] each
        q, k = apply_rope(q, positions, self.theta), apply_rope(k, positions, self.theta)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # [B, S, D]: the cached tokens, then these T
        o = mfa_attention(q, k, v)  # [B, T, heads, D]
        return self.o_proj(o.reshape(B, T, self.heads * self.head_dim))  # [B, T, H]


class MLP(nn.Module):
    """Dense SwiGLU (dense layers and the shared expert)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _linear(hidden, inter), _linear(hidden, inter), \
            _linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class MoE(nn.Module):
    """Router (`gate`) + E routed experts stored fused; the shared expert lives beside it in the layer."""

    def __init__(self, cfg: Step3Config):
        super().__init__()
        E, Ie, H = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.gate = _linear(H, E)
        self.gate_proj, self.up_proj, self.down_proj = Stacked(E, Ie, H), Stacked(E, Ie, H), Stacked(E, H, Ie)
        self.top_k, self.norm_expert_weight = cfg.moe_top_k, cfg.norm_expert_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, H]
        y = moe(flat, self.gate.weight, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                self.top_k, self.norm_expert_weight)
        return y.view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Step3Config, index: int):
        super().__init__()
        self.index, self.is_moe = index, cfg.is_moe_layer(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_moe:
            self.moe = MoE(cfg)
            self.share_expert = MLP(cfg.hidden_size, cfg.share_expert_dim)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, self.index)  # [B, T, H]
        h = self.post_attention_layernorm(x)
        y = self.moe(h) + self.share_expert(h) if self.is_moe else self.mlp(h)  # no routed scaling
        return x + y


class Decoder(nn.Module):
    def __init__(self, cfg: Step3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.embed_tokens(ids)  # [B, T, H]
        for layer in self.layers:
            x = layer(x, positions, cache)
        return self.norm(x)


# ---- the model ---------------------------------------------------------------------------------
class Step3Reference(nn.Module):
    """The whole text model: embed -> layers -> norm -> lm_head (untied). Eval only, no autograd use."""

    def __init__(self, cfg: Step3Config, weights: Mapping[str, torch.Tensor] | WeightSource | None = None, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
                 progress: ProgressFn | None = None):
        """Build with `weights` (a WeightSource or {HF name: tensor}); without them, seeded random ones.

        `progress(done_bytes, total_bytes, tensor_name)` follows the load.
        """
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        with torch.device("meta"):  # no memory until the real weights arrive
            self.model = Decoder(cfg)
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size)
        self.to(dtype=dtype).to_empty(device=device)
        self.requires_grad_(False)
        if weights is None:
            self._init_random(seed)
        else:
            self._load(TensorDict(weights, cfg) if isinstance(weights, Mapping) else weights, progress)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        progress: ProgressFn | None = None) -> Step3Reference:
        """Load an HF checkpoint or AFD layout tensor by tensor (FP8 dequantized on load) into `dtype`."""
        source = open_weights(path)
        try:
            return cls(source.config, source, dtype=dtype, device=device, progress=progress)
        finally:
            close = getattr(source, "close", None)  # release shard handles once every tensor is copied
            if close is not None:
                close()

    def _load(self, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Copy every text tensor of the table from `source`; name what is missing or misshapen."""
        params = dict(self.named_parameters())
        specs = text_tensor_specs(self.cfg)
        assert set(params) == {s.name for s in specs}, "module names drifted from converters/names.py"
        where = getattr(source, "path", "checkpoint")
        available = set(source.names())
        missing = [s.name for s in specs if s.name not in available]
        if missing:
            raise CheckpointError(f"{where}: {len(missing)} tensor(s) of the text model are missing "
                                  f"(is it a complete Step-3 checkpoint?)", missing[:10])
        done, total = 0, sum(p.numel() * p.element_size() for p in params.values())
        for spec in specs:
            w = source.get_weight(spec.name, self.dtype)
            if tuple(w.shape) != spec.shape:
                raise CheckpointError(f"{where}: tensor {spec.name} has shape {tuple(w.shape)}, "
                                      f"config.json implies {spec.shape}")
            params[spec.name].copy_(w)
            done += params[spec.name].numel() * params[spec.name].element_size()
            if progress is not None:
                progress(done, total, spec.name)

    def _init_random(self, seed: int) -> None:
        """Seeded weights with O(1) activations: N(0, 1/fan_in) matrices, norms near 1, N(0, 1) embeddings."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                w = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name == "model.embed_tokens.weight":
                w = torch.randn(p.shape, generator=gen)
            else:
                w = torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5
            p.copy_(w)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.lm_head.weight.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]. With a cache: these tokens follow the cached ones."""
        self._check_ids(input_ids)
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)  # [T]
        h = self.model(input_ids, positions, cache)  # [B, T, H]
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(h)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> torch.Tensor:
        """Greedy decoding with the KV cache: ids [B, T] -> [B, T + n], n <= max_new_tokens.

        Stops early once every row has produced a stop id (`eos_token_id`: one id, or several, e.g. EOS
        and end-of-turn); rows that finished earlier are padded with the first stop id.
        """
        self._check_ids(ids)
        if max_new_tokens < 0:
            raise Step3Error(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = ids.shape[1] + max_new_tokens
        if total > self.cfg.max_position_embedding:
            raise Step3Error(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embedding ({self.cfg.max_position_embedding}) of "
                             f"{self.cfg.source}")
        stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                             dtype=torch.long, device=ids.device)
        cache = self.new_cache(ids.shape[0], total)
        out, done = ids, torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        logits = self(ids, cache)  # prefill: [B, T, V]
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(dim=-1)  # [B]
            if len(stops):
                token = torch.where(done, stops[0], token)
                done |= torch.isin(token, stops)
            out = torch.cat([out, token[:, None]], dim=1)
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self(token[:, None], cache)  # decode one token: [B, 1, V]
        return out

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
            raise Step3Error(f"input_ids must be a non-empty int64 tensor [batch, tokens], got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.cfg.vocab_size:
            raise Step3Error(f"input_ids hold ids outside 0..{self.cfg.vocab_size - 1} (vocab_size of "
                             f"{self.cfg.source}); was the prompt encoded with this model's tokenizer?")
