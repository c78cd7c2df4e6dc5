"""The paper's decode-cost model (arXiv 2507.19427, section 4): Tables 2, 3, 5, 6 and 7, derived.

Roofline per decoded token, with AFD letting attention and FFN run on different accelerators:
  attention seconds = max(attention FLOPs / FLOP/s, KV bytes / (B/s)) + linear FLOPs / FLOP/s
  FFN seconds       = FFN FLOPs / FLOP/s
  USD per 1M tokens = seconds x price per second x 1e6
Nothing is typed in: every figure comes from an `Architecture` and an `Accelerator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.bench.architectures import Architecture
from runtime.bench.hardware import Accelerator

# The paper's Table 7 setting: 50 ms TPOT split over a 3-stage pipeline (attention, FFN, network);
# tokens go A->F in FP8 (1 byte per hidden value) and come back in BF16 (2 bytes); expert weights
# are FP8 (1 byte), so one token does 2 FLOPs per weight byte read.
TPOT_S = 0.050
PIPELINE_STAGES = 3
A2F_BYTES, F2A_BYTES, WEIGHT_BYTES = 1, 2, 1
TIE_FRACTION = 0.01  # accelerators within 1% of the cheapest are reported as equally cheap

ASSUMPTIONS = (
    "Decode roofline at peak rates: attention = max(attention FLOPs / FLOP/s, KV bytes / memory B/s) "
    "+ linear FLOPs / FLOP/s; FFN = FFN FLOPs / FLOP/s (paper section 4).",
    "Per token with C cached tokens: KV bytes and attention FLOPs summed over all layers; linear and FFN "
    "FLOPs = 2 x parameters touched; embedding, LM head and MoE router not counted.",
    "FLOP/s are dense FP8 where the chip has FP8, else BF16 (A800, 910B); "
    "cost = GPU-seconds x $/hour / 3600.",
    "Cheapest AFD pairing: cheapest attention accelerator + cheapest FFN accelerator, each chosen alone.",
    "Min MoE sparsity (Table 7): S >= (A2F + F2A bytes) x H x L x FLOP/s x weight bytes / (2 x memory B/s x "
    "server network B/s x TPOT/stages), with 1 + 2 bytes, FP8 weights, 50 ms / 3 stages, 8-GPU servers.",
)


@dataclass(frozen=True)
class PerToken:
    """Tables 2 and 3: what one decoded token costs in compute and memory at `context` cached tokens."""

    model: str
    context: int
    kv_bytes: float
    attention_flops: float
    linear_flops: float
    ffn_flops: float

    @property
    def arithmetic_intensity(self) -> float:
        """Attention FLOPs per KV byte (MFA 128, MLA 512, GQA-4 32 with an 8-bit cache)."""
        return self.attention_flops / self.kv_bytes


def per_token(model: Architecture, context: int, kv_bytes_per_value: int = 1) -> PerToken:
    return PerToken(model.name, context, model.kv_bytes(context, kv_bytes_per_value),
                    model.attention_flops(context), model.linear_flops(), model.ffn_flops())


def attention_seconds(pt: PerToken, hw: Accelerator) -> float:
    return max(pt.attention_flops / hw.flops, pt.kv_bytes / hw.memory_bw) + pt.linear_flops / hw.flops


def ffn_seconds(pt: PerToken, hw: Accelerator) -> float:
    return pt.ffn_flops / hw.flops


def usd_per_1m(seconds: float, hw: Accelerator) -> float:
    return seconds * hw.usd_per_second * 1e6


@dataclass(frozen=True)
class UnitCost:
    """Table 5: price per second over peak rate."""

    hardware: str
    usd_per_flop: float
    usd_per_byte: float


def unit_cost(hw: Accelerator) -> UnitCost:
    return UnitCost(hw.name, hw.usd_per_second / hw.flops, hw.usd_per_second / hw.memory_bw)


@dataclass(frozen=True)
class Pairing:
    """The cheapest AFD pairing of one model at one context (ties within TIE_FRACTION listed together)."""

    attention_hw: tuple[str, ...]
    attention_usd: float
    ffn_hw: tuple[str, ...]
    ffn_usd: float

    @property
    def total_usd(self) -> float:
        return self.attention_usd + self.ffn_usd


def _cheapest(costs: dict[str, float]) -> tuple[tuple[str, ...], float]:
    best = min(costs.values())
    names = sorted((n for n, c in costs.items() if c <= best * (1 + TIE_FRACTION)), key=costs.__getitem__)
    return tuple(names), best


def min_sparsity(model: Architecture, hw: Accelerator, tpot_s: float = TPOT_S,
                 stages: int = PIPELINE_STAGES) -> float:
    """Table 7: the least MoE sparsity that keeps FFN compute-bound under the network limit.

    Per layer a stage has T = TPOT / stages / L. A server can receive B <= net x T / ((A2F + F2A) x H)
    tokens; each activated expert then sees S x B of them, i.e. 2 S B / weight_bytes FLOPs per weight
    byte, which must reach the ridge FLOP/s / memory B/s.
    """
    stage_s = tpot_s / stages
    return ((A2F_BYTES + F2A_BYTES) * model.hidden * model.layers * hw.flops * WEIGHT_BYTES
            / (2 * hw.memory_bw * hw.server_network_bw * stage_s))


@dataclass
class CostReport:
    """Every table of `step3 bench model`, keyed model -> context -> hardware."""

    models: list[Architecture]
    contexts: list[int]
    hardware: list[Accelerator]
    kv_bytes_per_value: int
    per_token: dict[str, dict[int, PerToken]] = field(default_factory=dict)
    attention_usd: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    ffn_usd: dict[str, dict[str, float]] = field(default_factory=dict)
    pairings: dict[str, dict[int, Pairing]] = field(default_factory=dict)
    unit_costs: dict[str, UnitCost] = field(default_factory=dict)
    min_sparsity: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        per_tok = {m: {str(c): {"kv_bytes": p.kv_bytes, "attention_flops": p.attention_flops,
                                "linear_flops": p.linear_flops, "ffn_flops": p.ffn_flops,
                                "arithmetic_intensity": p.arithmetic_intensity} for c, p in by_c.items()}
                   for m, by_c in self.per_token.items()}
        cost = {m: {"attention": {str(c): dict(v) for c, v in self.attention_usd[m].items()},
                    "ffn": dict(self.ffn_usd[m])} for m in self.attention_usd}
        pair = {m: {str(c): {"attention_hw": list(p.attention_hw), "attention_usd": p.attention_usd,
                             "ffn_hw": list(p.ffn_hw), "ffn_usd": p.ffn_usd, "total_usd": p.total_usd}
                    for c, p in by_c.items()} for m, by_c in self.pairings.items()}
        units = {h: {"usd_per_flop": u.usd_per_flop, "usd_per_byte": u.usd_per_byte}
                 for h, u in self.unit_costs.items()}
        return {"tables": {"per_token": per_tok, "unit_costs": units, "cost_per_1m_tokens": cost,
                           "cheapest_afd": pair, "min_moe_sparsity": self.min_sparsity},
                "kv_bytes_per_value": self.kv_bytes_per_value,
                "model_sparsity": {m.name: m.ffn.sparsity for m in self.models},
                "hardware": {h.name: {"usd_per_hour": h.usd_per_hour, "flops": h.flops,
                                      "flops_dtype": h.flops_dtype, "memory_bw": h.memory_bw,
                                      "network_gbps": h.network_gbps, "source": h.source}
                             for h in self.hardware},
                "assumptions": list(ASSUMPTIONS)}


def cost_report(models: list[Architecture], contexts: list[int], hardware: list[Accelerator],
                kv_bytes_per_value: int = 1) -> CostReport:
    """Build Tables 2/3 (per token), 5 (unit costs), 6 (USD per 1M tokens, cheapest pairing) and 7."""
    r = CostReport(models, contexts, hardware, kv_bytes_per_value)
    r.unit_costs = {h.name: unit_cost(h) for h in hardware}
    for m in models:
        r.per_token[m.name] = {c: per_token(m, c, kv_bytes_per_value) for c in contexts}
        any_pt = r.per_token[m.name][contexts[0]]
        r.ffn_usd[m.name] = {h.name: usd_per_1m(ffn_seconds(any_pt, h), h) for h in hardware}
        r.attention_usd[m.name] = {c: {h.name: usd_per_1m(attention_seconds(pt, h), h) for h in hardware}
                                   for c, pt in r.per_token[m.name].items()}
        ffn_names, ffn_best = _cheapest(r.ffn_usd[m.name])
        r.pairings[m.name] = {}
        for c, costs in r.attention_usd[m.name].items():
            att_names, att_best = _cheapest(costs)
            r.pairings[m.name][c] = Pairing(att_names, att_best, ffn_names, ffn_best)
        r.min_sparsity[m.name] = {h.name: min_sparsity(m, h) for h in hardware}
    return r
