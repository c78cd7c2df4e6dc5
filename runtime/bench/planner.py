"""An AFD planner: how many attention and FFN instances, what batch, how many tokens/s/GPU.

It is a model, not a measurement. Per layer and per micro-batch it prices three pipeline stages
on a roofline (each at an assumed fraction of peak, `Efficiency`), runs `micro_batches` of them
through a 3-stage pipeline (attention, FFN, network) and grows the batch until the time per
output token (TPOT) reaches the budget or the KV cache no longer fits. ASSUMPTIONS lists every
simplification; the CLI prints them next to the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from runtime.bench.architectures import Architecture
from runtime.bench.cost_model import F2A_BYTES
from runtime.bench.hardware import Accelerator

ASSUMPTIONS = (
    "Instances are 8-GPU servers. Attention is data-parallel: each GPU holds its own requests and KV cache "
    "and reads its attention weights (FP8) once per micro-batch per layer.",
    "Every cached token is read at every step (context = cached tokens per request, the same for all).",
    "FFN weights (FP8) are split evenly over all FFN GPUs (EP for experts, TP for dense/shared), load "
    "perfectly balanced; a routed expert is read if at least one token of the micro-batch picks it.",
    "Every token goes to every FFN instance (each holds a slice of the shared/dense FFN): A->F 1 byte "
    "(FP8) and F->A 2 bytes (BF16) per hidden value per FFN instance, over one NIC per GPU.",
    "Stage time = roofline max(FLOPs / (peak x efficiency), bytes / (peak x efficiency)); "
    "network time = bytes / (NIC x efficiency); no latency, no launch or synchronization overhead.",
    "Pipeline: stages overlap perfectly, so a layer takes micro_batches x its slowest stage; fill and drain "
    "ignored. TPOT = sum over layers.",
    "Embedding, LM head, router, norms and sampling are free; prefill does not interfere with decode.",
    "KV cache plus FP8 attention weights must fit in 90% of an attention GPU's memory.",
)

# The paper's Hopper deployments (Step-3, FP8, no MTP, 50 ms TPOT; section 6):
# (context, A, F, measured tok/s/GPU, batch where the paper states it). 32K is the paper's own estimate.
PAPER_DEPLOYMENTS = ((4096, 2, 2, 4039.0, 6144), (8192, 4, 2, 2643.0, None), (32768, 16, 2, 898.0, None))


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak each stage is assumed to reach (1.0 = the roofline).

    FFN compute defaults to 0.6: block-FP8 GEMMs measured 1,161 of 1,979 TFLOP/s on an H200 (STEP3.md 6).
    """

    attention_memory: float = 1.0
    attention_compute: float = 1.0
    ffn_compute: float = 0.6
    ffn_memory: float = 1.0
    network: float = 1.0

    def scaled(self, factor: float) -> Efficiency:
        return Efficiency(*(factor * v for v in (self.attention_memory, self.attention_compute,
                                                 self.ffn_compute, self.ffn_memory, self.network)))


@dataclass(frozen=True)
class PlanSetup:
    model: Architecture
    context: int
    attention_hw: Accelerator
    ffn_hw: Accelerator
    tpot_s: float = 0.050
    micro_batches: int = 3
    kv_bytes_per_value: int = 1
    weight_bytes: int = 1
    memory_fraction: float = 0.9
    efficiency: Efficiency = field(default_factory=Efficiency)


@dataclass(frozen=True)
class Plan:
    attention_instances: int
    ffn_instances: int
    batch: int
    tpot_s: float
    stage_us: dict[str, float]  # per MoE layer, per micro-batch
    limited_by: str  # "TPOT" or "KV mem" (the KV cache fills the attention GPUs first)

    @property
    def gpus(self) -> int:
        return 8 * (self.attention_instances + self.ffn_instances)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.batch / self.tpot_s / self.gpus if self.batch else 0.0

    @property
    def name(self) -> str:
        return f"{self.attention_instances}A{self.ffn_instances}F"


def _attention_s(s: PlanSetup, n: float) -> float:
    """One attention GPU, one layer, one micro-batch of n requests."""
    m, hw, e = s.model, s.attention_hw, s.efficiency
    params = m.attention_params_per_layer()
    flops = n * (s.context * m.attention.flops_per_cached_token() + 2 * params)
    nbytes = n * s.context * m.attention.cached_values() * s.kv_bytes_per_value + params * s.weight_bytes
    return max(flops / (hw.flops * e.attention_compute), nbytes / (hw.memory_bw * e.attention_memory))


def _ffn_s(s: PlanSetup, ffn_gpus: int, tokens: float, moe: bool) -> float:
    """All FFN GPUs together, one layer, one micro-batch of `tokens` tokens."""
    f, h, hw, e = s.model.ffn, s.model.hidden, s.ffn_hw, s.efficiency
    if moe:
        active = f.moe_layer_params(h, active=True)
        touched = f.experts * (1 - (1 - f.top_k / f.experts) ** tokens)  # expected experts hit
        weights = touched * 3 * h * f.expert_intermediate + f.shared_experts * 3 * h * f.shared_intermediate
    else:
        active = weights = f.dense_layer_params(h)
    compute = tokens * 2 * active / (ffn_gpus * hw.flops * e.ffn_compute)
    return max(compute, weights * s.weight_bytes / (ffn_gpus * hw.memory_bw * e.ffn_memory))


def _network_s(s: PlanSetup, a: int, f: int, tokens: float) -> float:
    """The busier NIC: each attention NIC receives F BF16 partials per token, each FFN NIC sends its share."""
    f2a = tokens * s.model.hidden * F2A_BYTES * f  # A->F carries half of that (FP8) on the other direction
    nic = min(s.attention_hw.gpu_network_bw, s.ffn_hw.gpu_network_bw) * s.efficiency.network
    return f2a / (8 * min(a, f)) / nic


def stage_times(s: PlanSetup, a: int, f: int, batch: float) -> tuple[float, float, float, float]:
    """(attention, FFN dense layer, FFN MoE layer, network) seconds per layer per micro-batch."""
    tokens = batch / s.micro_batches
    return (_attention_s(s, tokens / (8 * a)), _ffn_s(s, 8 * f, tokens, moe=False),
            _ffn_s(s, 8 * f, tokens, moe=True), _network_s(s, a, f, tokens))


def tpot(s: PlanSetup, a: int, f: int, batch: float) -> float:
    att, dense, moe, net = stage_times(s, a, f, batch)
    ffn = s.model.ffn
    per_layer = ffn.dense_layers * max(att, dense, net) + ffn.moe_layers * max(att, moe, net)
    return s.micro_batches * per_layer


def kv_batch_limit(s: PlanSetup, a: int) -> int:
    """Most requests the attention GPUs hold: KV cache + FP8 attention weights in memory_fraction of HBM."""
    m = s.model
    per_request = m.kv_bytes(s.context, s.kv_bytes_per_value)
    free = s.attention_hw.memory_bytes * s.memory_fraction - m.layers * m.attention_params_per_layer()
    return max(0, int(free // per_request)) * 8 * a


def evaluate(s: PlanSetup, a: int, f: int) -> Plan:
    """The largest batch that meets the TPOT budget and fits the KV cache, for a fixed aAfF layout."""
    cap = kv_batch_limit(s, a)
    batch = cap
    if tpot(s, a, f, cap) > s.tpot_s:
        lo, hi = 0, cap  # TPOT grows with the batch: bisect for the largest batch within budget
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if tpot(s, a, f, mid) <= s.tpot_s else (lo, mid)
        batch = lo
    limited = "KV mem" if batch == cap else "TPOT"
    att, _dense, moe, net = stage_times(s, a, f, max(batch, 1))
    stages = {"attention": att * 1e6, "ffn": moe * 1e6, "network": net * 1e6}
    return Plan(a, f, batch, tpot(s, a, f, max(batch, 1)), stages, limited)


def best_plans(s: PlanSetup, max_attention: int = 32, max_ffn: int = 8, top: int = 5) -> list[Plan]:
    """Every aAfF layout up to the limits, best tokens/s/GPU first."""
    plans = [evaluate(s, a, f) for a in range(1, max_attention + 1) for f in range(1, max_ffn + 1)]
    return sorted(plans, key=lambda p: -p.tokens_per_s_per_gpu)[:top]


def _with_efficiency(s: PlanSetup, which: str, x: float) -> PlanSetup:
    eff = s.efficiency.scaled(x) if which == "uniform" else replace(s.efficiency, **{which: x})
    return replace(s, efficiency=eff)


def efficiency_to_match(s: PlanSetup, a: int, f: int, measured: float, which: str) -> float | None:
    """The efficiency (a field of Efficiency, or 'uniform': a factor on all) at which the model predicts
    `measured` tokens/s/GPU. None if 1.0 cannot reach it. Bisection: throughput rises with efficiency.
    """
    def predicted(x: float) -> float:
        return evaluate(_with_efficiency(s, which, x), a, f).tokens_per_s_per_gpu

    if predicted(1.0) < measured:
        return None
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted(mid) < measured else (lo, mid)
    return hi


@dataclass(frozen=True)
class PaperComparison:
    context: int
    layout: str
    measured: float
    paper_batch: int | None
    predicted: Plan  # at the setup's efficiencies
    attention_memory_needed: float | None
    at_match: Plan | None  # the plan at that attention HBM efficiency
    uniform_needed: float | None


def compare_with_paper(s: PlanSetup) -> list[PaperComparison]:
    """The planner's predictions for the paper's three deployments, and the efficiencies that match them."""
    rows = []
    for context, a, f, measured, batch in PAPER_DEPLOYMENTS:
        sc = replace(s, context=context)
        need = efficiency_to_match(sc, a, f, measured, "attention_memory")
        at_match = None if need is None else evaluate(_with_efficiency(sc, "attention_memory", need), a, f)
        rows.append(PaperComparison(context, f"{a}A{f}F", measured, batch, evaluate(sc, a, f), need, at_match,
                                    efficiency_to_match(sc, a, f, measured, "uniform")))
    return rows
