"""The TMA MoE path (moe_tma.py, fp8_gemm_tma.py): gather, grouped GEMMs, scatter, expert ranges.

Runs under the CPU interpreter (tensor descriptors included; ws128 falls back to the portable kernel
there) and on a GPU, where ws128 is the warp-specialized Gluon kernel (Hopper, GLUON_TRITONS). Widths
are whole 128 tiles (the path's precondition); K = 384 gives three scale groups per row.
"""

import pytest
import torch
from ffn_inputs import DEVICE, REQUANT_TOL, fp8_weight, randn, rel_err

from runtime.kernels.act_quant import act_quant
from runtime.kernels.fp8_linear import gluon_usable
from runtime.kernels.moe import MOE_CANDIDATES, ExpertWeights, MoeConfig, fused_moe, fused_moe_ref
from runtime.kernels.moe_routing import align_by_expert, route_topk
from runtime.kernels.moe_tma import gate_up_quant, gather_rows, tma_moe_usable

H, INTER, E, K = 384, 256, 6, 3
# the portable Triton kernel (fp8_gemm_tma.py) and the Gluon one (fp8_gemm_ws.py) at both stage counts,
# with h quantized in its gate_up epilogue (ws128q; on the CPU: the portable kernel + act_quant), and the
# persistent one with 192-row tiles (wsp192g4; on the CPU: the portable kernel over 64-row blocks)
CONFIGS = {name: MOE_CANDIDATES[name] for name in ("tma128", "ws128", "ws128s6", "ws128q", "wsp192g4")}


def _experts(seed: int, lo: int = 0, hi: int = E) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((E, INTER, H), (E, INTER, H), (E, H, INTER)))
    return ExpertWeights(g[lo:hi], u[lo:hi], d[lo:hi], gs[lo:hi], us[lo:hi], ds[lo:hi], first=lo,
                         num_experts=E)


def _routing(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random routing; expert 4 never wins (no tokens: its M-blocks do not exist)."""
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    logits[:, 4] = -30.0
    return route_topk(logits.to(DEVICE), K, renormalize=False)


@pytest.mark.parametrize("kernel, hidden", [(False, H), (True, H), (True, 2200)])
def test_gather_rows_puts_each_pair_token_at_its_sorted_position(kernel, hidden):
    """Both paths; 2200 columns: three column blocks of the kernel, the last one and scale group partial."""
    x = act_quant(randn((9, hidden), torch.Generator().manual_seed(1)))
    _, ids = _routing(9, seed=1)
    rows, _ = align_by_expert(ids, 0, E, 16)
    a, a_s = gather_rows(x, rows, K, kernel=kernel)
    real = rows < 9 * K  # padding rows are not defined
    tok = (rows[real] // K).long()
    assert real.sum() == 9 * K and (~real).sum() > 0
    assert torch.equal(a.view(torch.uint8)[real], x.q.view(torch.uint8)[tok])
    assert a_s.stride(1) == 1 and torch.equal(a_s[:, real], x.scale_inv[tok].t())


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("T", [1, 37])
def test_tma_moe_matches_reference(name, T):
    ex = _experts(seed=T)
    assert tma_moe_usable(ex)
    x = randn((T, H), torch.Generator().manual_seed(T))
    w, ids = _routing(T, seed=T)
    out = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=CONFIGS[name])
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < REQUANT_TOL
    gather = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=MoeConfig(block_m=16, group_m=1))
    assert rel_err(out, gather) < REQUANT_TOL  # and the gathering kernel


@pytest.mark.parametrize("name", ["ws128", "ws128q"])
def test_tma_expert_ranges_sum_to_the_full_moe(name):
    x = randn((23, H), torch.Generator().manual_seed(7))
    w, ids = _routing(23, seed=7)
    config = CONFIGS[name]
    full = fused_moe(x, w, ids, _experts(seed=7), out_dtype=torch.float32, config=config)
    parts = [fused_moe(x, w, ids, _experts(seed=7, lo=a, hi=b), out_dtype=torch.float32, config=config)
             for a, b in ((0, 2), (2, 6))]
    assert rel_err(sum(parts), full) < REQUANT_TOL
    assert all(rel_err(p, full) > 0.05 for p in parts)


@pytest.mark.parametrize("name", ["tma128", "wsp192g4"])
def test_tma_config_falls_back_on_widths_that_are_not_whole_tiles(name):
    gen = torch.Generator().manual_seed(3)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((E, 192, 200), (E, 192, 200), (E, 200, 192)))
    ex = ExpertWeights(g, u, d, gs, us, ds)
    assert not tma_moe_usable(ex)
    x = randn((5, 200), gen)
    w, ids = _routing(5, seed=3)
    out = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=CONFIGS[name])
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < REQUANT_TOL  # the gathering kernel ran (64-row blocks
    # for the 192-row config: the gathering kernel's tiles are powers of two)


gluon_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and gluon_usable(torch.device("cuda"))),
                               reason="the Gluon kernels need Hopper and a Triton of GLUON_TRITONS")


@pytest.mark.gpu
@gluon_gpu
def test_ws_gate_up_epilogue_quantizes_h_exactly_like_act_quant():
    """ws128q's epilogue and act_quant over ws128's fp32 h: the same h, so the same FP8 codes and scales
    on every row of a pair."""
    ex = _experts(seed=11)
    x = act_quant(randn((41, H), torch.Generator().manual_seed(11)))
    _, ids = _routing(41, seed=11)
    rows, block_expert = align_by_expert(ids, 0, E, 128)
    a, a_s = gather_rows(x, rows, K)
    fused = gate_up_quant(a, a_s, ex, block_expert, rows, 41 * K, MOE_CANDIDATES["ws128q"])
    plain = gate_up_quant(a, a_s, ex, block_expert, rows, 41 * K, MOE_CANDIDATES["ws128"])
    real = rows < 41 * K  # padding rows hold whatever their undefined A rows give (NaN codes too)
    assert fused.q.shape == plain.q.shape == (rows.numel(), INTER)
    assert torch.equal(fused.scale_inv[real], plain.scale_inv[real])
    assert torch.equal(fused.q.view(torch.uint8)[real], plain.q.view(torch.uint8)[real])
    assert fused.q[real].float().abs().amax() > 100  # real codes, not an unwritten buffer


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("name", ["wsp", "wsps", "wspsd", "wspsd6", "wsp192g4", "wsp192g4s5"])
@pytest.mark.parametrize("T, sms, lo, hi", [(37, 132, 0, E), (300, 3, 0, E), (1000, 5, 2, 5)])
def test_persistent_kernel_equals_ws128q_bit_for_bit(name, T, sms, lo, hi, monkeypatch):
    """fp8_gemm_wsp.py (persistent, producer warp, padding halves skipped) against ws128q: the same products
    in the same order, so the same bits; on a pretend GPU of `sms` SMs every CTA loops over many tiles
    (at 300 tokens ~180 pairs per expert: each expert's second block is half padding)."""
    from runtime.kernels import fp8_gemm_wsp

    monkeypatch.setitem(fp8_gemm_wsp._SMS, torch.cuda.current_device(), sms)
    ex = _experts(seed=T, lo=lo, hi=hi)
    x = randn((T, H), torch.Generator().manual_seed(T))
    w, ids = _routing(T, seed=T)
    out = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=MOE_CANDIDATES[name])
    plain = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=MOE_CANDIDATES["ws128q"])
    assert torch.equal(out, plain)
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < REQUANT_TOL


@pytest.mark.gpu
@gluon_gpu
@pytest.mark.parametrize("name, block_m, T",
                         [("wsps", 128, 300), ("wspsd", 128, 300), ("wsp192g4", 192, 180)])
def test_persistent_gate_up_skips_padding_parts_and_keeps_real_rows(name, block_m, T):
    """The skipping kernels' h: rows of pairs bit-equal to ws128q's (the same pair's row in its 128-row
    layout); a 64-row part that is all padding ran no wgmma (its h is zero: codes 0), where a kernel that
    does not skip computes whatever its padding A rows hold. At 300 tokens 168-190 pairs
    per expert leave each expert's second 128-row block half padding; at 180, 101-115 pairs leave the
    last third of each 192-row block padding."""
    ex = _experts(seed=13)
    x = act_quant(randn((T, H), torch.Generator().manual_seed(13)))
    _, ids = _routing(T, seed=13)
    layouts = [align_by_expert(ids, 0, E, bm) for bm in (block_m, 128)]
    (rows, block_expert), (rows128, _) = layouts
    skip, plain = (gate_up_quant(*gather_rows(x, r, K), ex, be, r, T * K, MOE_CANDIDATES[n])
                   for (r, be), n in zip(layouts, (name, "ws128q"), strict=True))
    real, real128 = rows < T * K, rows128 < T * K
    assert torch.equal(rows[real], rows128[real128])  # both list the pairs in the same order
    assert torch.equal(skip.q.view(torch.uint8)[real], plain.q.view(torch.uint8)[real128])
    assert torch.equal(skip.scale_inv[real], plain.scale_inv[real128])
    part = rows.view(-1, 64)[:, 0] >= T * K  # parts that start with padding: all padding
    used = (block_expert >= 0).repeat_interleave(block_m // 64)
    skipped = (part & used).repeat_interleave(64)
    assert skipped.sum() >= 4 * 64
    assert (skip.q.view(torch.uint8)[skipped] == 0).all()
    assert (plain.q.view(torch.uint8)[rows128 == 0] != 0).any()  # token 0's h (slot 0): not zero codes
