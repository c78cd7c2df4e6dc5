"""The AFD planner: stage times by hand, TPOT monotone in the batch, the largest batch within budget,
memory caps, and the efficiency that reproduces a measured throughput."""

from __future__ import annotations

from dataclasses import replace

import pytest

from runtime.bench.architectures import get_model
from runtime.bench.hardware import PAPER_HARDWARE
from runtime.bench.planner import (
    PAPER_DEPLOYMENTS,
    Efficiency,
    PlanSetup,
    best_plans,
    compare_with_paper,
    efficiency_to_match,
    evaluate,
    kv_batch_limit,
    stage_times,
    tpot,
)

H800 = PAPER_HARDWARE["H800"]
STEP3 = get_model("step3")


@pytest.fixture
def setup() -> PlanSetup:
    return PlanSetup(STEP3, 4096, H800, H800)


def test_stage_times_by_hand(setup):
    batch = 3 * 2048  # the paper's 4K run: 3 micro-batches of 2,048 tokens on 2A2F
    att, dense, moe, net = stage_times(setup, 2, 2, batch)
    params = 7168 * 2048 + 2 * 7168 * 256 + 2048 * 64 * 256 + 64 * 256 * 7168  # FP8 attention weights
    n = 2048 / 16  # requests per attention GPU per micro-batch
    assert att == pytest.approx((n * 4096 * 512 + params) / 3.35e12)  # memory-bound
    moe_flops = 2048 * 2 * 4 * 3 * 7168 * 5120  # 3 routed + 1 shared expert
    touched = 48 * (1 - (1 - 3 / 48) ** 2048)  # all 48 experts, practically
    moe_weights = (touched + 1) * 3 * 7168 * 5120  # FP8 bytes
    assert moe == pytest.approx(max(moe_flops / (16 * 1.98e15 * 0.6), moe_weights / (16 * 3.35e12)))
    assert moe == pytest.approx(moe_weights / (16 * 3.35e12))  # at 2,048 tokens: weight reads dominate
    assert net == pytest.approx(2048 * 7168 * 2 * 2 / 16 / 50e9)  # 2 BF16 partials over 16 NICs
    assert dense < moe


def test_tpot_grows_with_the_batch(setup):
    times = [tpot(setup, 2, 2, b) for b in (0, 512, 2048, 6144, 12288)]
    assert times == sorted(times) and times[0] > 0  # weights alone cost time


def test_evaluate_picks_the_largest_batch_within_budget(setup):
    tight = replace(setup, efficiency=Efficiency(attention_memory=0.4))
    plan = evaluate(tight, 2, 2)
    assert plan.limited_by == "TPOT"
    assert tpot(tight, 2, 2, plan.batch) <= tight.tpot_s < tpot(tight, 2, 2, plan.batch + 1)
    assert plan.tokens_per_s_per_gpu == pytest.approx(plan.batch / plan.tpot_s / 32)


def test_kv_memory_caps_the_batch(setup):
    cap = kv_batch_limit(setup, 2)
    per_gpu = (0.9 * 80e9 - 61 * STEP3.attention_params_per_layer()) // (4096 * 61 * 512)
    assert cap == per_gpu * 16
    plan = evaluate(setup, 2, 2)  # at the roofline the 4K batch is capped by memory, not by TPOT
    assert plan.limited_by == "KV mem" and plan.batch == cap and plan.tpot_s < setup.tpot_s
    bf16 = replace(setup, kv_bytes_per_value=2)
    assert kv_batch_limit(bf16, 2) < cap


def test_more_attention_instances_serve_longer_contexts():
    s32 = PlanSetup(STEP3, 32768, H800, H800, efficiency=Efficiency(attention_memory=0.5))
    assert evaluate(s32, 16, 2).batch > 4 * evaluate(s32, 2, 2).batch


def test_best_plans_are_sorted(setup):
    plans = best_plans(setup, max_attention=6, max_ffn=3, top=4)
    rates = [p.tokens_per_s_per_gpu for p in plans]
    assert len(plans) == 4 and rates == sorted(rates, reverse=True)


def test_efficiency_to_match_reproduces_the_measurement(setup):
    need = efficiency_to_match(setup, 2, 2, 4039.0, "attention_memory")
    assert need is not None and 0.2 < need < 0.8
    matched = evaluate(replace(setup, efficiency=replace(setup.efficiency, attention_memory=need)), 2, 2)
    assert matched.tokens_per_s_per_gpu == pytest.approx(4039.0, rel=0.01)
    assert efficiency_to_match(setup, 2, 2, 1e6, "attention_memory") is None  # beyond the roofline


def test_paper_comparison_covers_the_three_deployments(setup):
    rows = compare_with_paper(setup)
    assert [(r.context, r.layout, r.measured) for r in rows] == [(c, f"{a}A{f}F", m)
                                                                  for c, a, f, m, _ in PAPER_DEPLOYMENTS]
    for r in rows:
        assert r.predicted.tokens_per_s_per_gpu > r.measured  # the roofline is an upper bound
        assert r.at_match is not None
        assert r.at_match.tokens_per_s_per_gpu == pytest.approx(r.measured, rel=0.01)
