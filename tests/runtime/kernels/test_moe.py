"""Fused MoE: routing, grouping by expert, grouped FP8/unquantized expert GEMMs, expert ranges."""

import pytest
import torch
from ffn_inputs import DEVICE, FP32_TOL, REQUANT_TOL, fp8_weight, randn, rel_err

from converters.errors import Step3Error
from quant.fp8 import dequantize_fp8
from runtime.kernels.act_quant import Fp8Act, act_dequant, act_quant
from runtime.kernels.mlp import MlpWeights, swiglu_mlp_ref
from runtime.kernels.moe import (
    MOE_CANDIDATES,
    ExpertWeights,
    MoeConfig,
    dequantized_experts,
    fused_moe,
    fused_moe_ref,
    moe_ffn,
)
from runtime.kernels.moe_cublas import cublas_moe
from runtime.kernels.moe_routing import align_by_expert, route_topk
from runtime.model import reference

H, INTER, E, K = 200, 192, 6, 3  # hidden and expert width not multiples of 128: edge blocks everywhere


SHAPES = ((E, INTER, H), (E, INTER, H), (E, H, INTER))  # gate, up, down


def _experts(seed: int, fp8: bool = True, lo: int = 0, hi: int = E) -> ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    if fp8:
        (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in (SHAPES))
        return ExpertWeights(g[lo:hi], u[lo:hi], d[lo:hi], gs[lo:hi], us[lo:hi], ds[lo:hi],
                             first=lo, num_experts=E)
    g, u, d = (torch.randn(s, generator=gen).div(s[-1] ** 0.5).to(DEVICE) for s in (SHAPES))
    return ExpertWeights(g[lo:hi], u[lo:hi], d[lo:hi], first=lo, num_experts=E)


def _routing(T: int, seed: int, starve: int | None = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random router logits; expert `starve` never wins (receives no tokens); a tie in row 0."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    if starve is not None:
        logits[:, starve] = -30.0
    logits[0, :3] = 2.5  # three-way tie at the top
    w, ids = route_topk(logits.to(DEVICE), K, renormalize=False)
    return w, ids


def test_route_topk_matches_model_reference_and_handles_ties():
    gen = torch.Generator().manual_seed(0)
    x, router = torch.randn(9, 64, generator=gen), torch.randn(E, 64, generator=gen)
    for renorm in (False, True):
        w, ids = route_topk(x @ router.t(), K, renorm)
        w_ref, ids_ref = reference.route(x, router, K, renorm)
        assert ids.dtype == torch.int32 and torch.equal(ids.long(), ids_ref)
        assert torch.allclose(w, w_ref, rtol=1e-6)
    w, ids = route_topk(torch.zeros(2, E), K, renormalize=True)  # all tied: any k distinct experts
    assert all(len(set(row)) == K for row in ids.tolist()) and ids.min() >= 0 and ids.max() < E
    assert torch.allclose(w, torch.full((2, K), 1 / 3))


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_by_expert_groups_every_local_pair_once(block_m, kernel):
    _, ids = _routing(29, seed=1)
    lo, hi = 1, 5
    rows, block_expert = align_by_expert(ids, lo, hi - lo, block_m, kernel=kernel)
    rows, block_expert, flat = rows.cpu(), block_expert.cpu(), ids.reshape(-1).cpu()
    assert rows.numel() == block_expert.numel() * block_m
    real = rows[rows < flat.numel()]
    mine = ((flat >= lo) & (flat < hi)).nonzero().flatten()
    assert torch.equal(real.sort().values, mine.int())  # each pair of [lo, hi) exactly once
    for b, e in enumerate(block_expert.tolist()):
        block = rows[b * block_m:(b + 1) * block_m]
        block = block[block < flat.numel()]
        if e < 0:
            assert block.numel() == 0
        else:
            assert (flat[block.long()] == lo + e).all()
            assert torch.equal(block, block.sort().values)  # stable: pair order kept


ALIGN_CASES = [(1, 6, 0, 6, 16), (29, 6, 2, 3, 64), (0, 6, 0, 6, 16), (300, 48, 0, 48, 192),
               (700, 48, 10, 30, 128)]


@pytest.mark.parametrize("T, experts, lo, hi, block_m", ALIGN_CASES)
def test_align_by_expert_kernels_match_torch(T, experts, lo, hi, block_m):
    """The two Triton launches give the torch version's rows and block experts exactly: many chunks (700 x 3
    pairs over 64 bins: 9 chunks), an expert range, experts without pairs, 192-row runs, no tokens."""
    gen = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:K] for _ in range(T)]) if T else \
        torch.zeros((0, K), dtype=torch.int64)
    ids = torch.where(ids == 4, 5, ids).int().to(DEVICE)  # expert 4 gets no pairs
    want = align_by_expert(ids, lo, hi - lo, block_m, kernel=False)
    got = align_by_expert(ids, lo, hi - lo, block_m, kernel=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("T, interleave", [(1, False), (29, False), (29, True)])
def test_fused_moe_fp8_matches_reference(T, interleave):
    ex = _experts(seed=T)
    x = randn((T, H), torch.Generator().manual_seed(T))
    w, ids = _routing(T, seed=T)
    config = MoeConfig(block_m=16, group_m=1, interleave=True) if interleave else None  # edge tiles too
    out = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=config)
    ref = fused_moe_ref(x, w, ids, ex)
    assert rel_err(out, ref) < REQUANT_TOL
    # the model's eager reference on dequantized weights differs only by the two FP8 activation
    # quantizations (~4% for random data; see benchmarks/NOTES_ffn.md)
    assert rel_err(out, reference.routed_experts(x.float(), w, ids.long(), *dequantized_experts(ex))) < 8e-2


def _candidates() -> list[str]:
    """One candidate per distinct tiling (warps and stages are the GPU compiler's business: the
    benchmark checks every candidate at Step-3's dims before timing it). The persistent Gluon kernel's
    modes count on a GPU only: on the CPU they all run ws128q's portable twin."""
    tilings = {}
    for name in sorted(MOE_CANDIDATES):
        c = MOE_CANDIDATES[name]
        tiling = (c.block_m, c.group_m, c.block_n_down, c.interleave, c.backend, c.warp_specialize,
                  c.fuse_quant) + ((c.persistent, c.skip_pad, c.defer) if DEVICE.type == "cuda" else ())
        tilings.setdefault(tiling, name)
    return sorted(tilings.values())


@pytest.mark.parametrize("name", _candidates())
def test_fused_moe_even_shapes_every_tuning_candidate(name):
    """Widths multiples of 128 (the unmasked EVEN K loop), each candidate benchmarks/moe_ffn.py times.

    T = 32 and 512-wide experts give every integer argument the 16-divisibility it has at Step-3's
    dims (the same specialization), so on a GPU the benchmark can reuse these compiles from Triton's cache.
    """
    gen = torch.Generator().manual_seed(19)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((E, 512, 512), (E, 512, 512), (E, 512, 512)))
    ex = ExpertWeights(g, u, d, gs, us, ds)
    x = randn((32, 512), gen)
    w, ids = _routing(32, seed=19)
    out = fused_moe(x, w, ids, ex, out_dtype=torch.float32, config=MOE_CANDIDATES[name])
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < REQUANT_TOL


def test_fused_moe_unquantized_experts_and_block_sizes():
    ex = _experts(seed=3, fp8=False)
    x = randn((21, H), torch.Generator().manual_seed(3))
    w, ids = _routing(21, seed=3, starve=None)
    ref = reference.routed_experts(x, w, ids.long(), ex.gate, ex.up, ex.down)
    for config in (MoeConfig(block_m=16, group_m=1), MoeConfig(block_m=64, block_n_down=256),
                   MoeConfig(block_m=32, group_m=2, interleave=True)):
        assert rel_err(fused_moe(x, w, ids, ex, config=config), ref) < FP32_TOL


@pytest.mark.parametrize("ranges", [[(0, 2), (2, 6)], [(0, 3), (3, 4), (4, 6)]])
def test_expert_ranges_sum_to_the_full_moe(ranges):
    x = randn((17, H), torch.Generator().manual_seed(7))
    w, ids = _routing(17, seed=7)
    full = fused_moe(x, w, ids, _experts(seed=7), out_dtype=torch.float32)
    parts = [fused_moe(x, w, ids, _experts(seed=7, lo=a, hi=b), out_dtype=torch.float32) for a, b in ranges]
    assert rel_err(sum(parts), full) < REQUANT_TOL  # ranks may pick other tiles: other MMA roundings
    assert all(rel_err(p, full) > 0.05 for p in parts)  # each rank holds only part of it
    assert parts[-1 if ranges[-1][0] == 4 else 1].abs().sum() > 0


def test_a_rank_picks_the_tiles_of_the_whole_layers_load(monkeypatch):
    """An AFD rank with 2 of 6 experts gets ~1/3 of the pairs over 1/3 of the experts: the same mean pairs
    per expert as the whole layer, so the default tiles are chosen with the layer's expert count."""
    from runtime.kernels import moe

    seen = []
    pick = moe.default_moe_config
    monkeypatch.setattr(moe, "default_moe_config", lambda t, k, e: seen.append((t, k, e)) or pick(t, k, e))
    x = randn((17, H), torch.Generator().manual_seed(7))
    w, ids = _routing(17, seed=7)
    fused_moe(x, w, ids, _experts(seed=7, lo=2, hi=4), out_dtype=torch.float32)
    assert seen == [(17, K, E)]


def test_moe_ffn_adds_the_shared_expert():
    ex = _experts(seed=11)
    gen = torch.Generator().manual_seed(11)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((256, H), (256, H), (H, 256)))
    shared = MlpWeights(g, gs, u, us, d, ds)
    x = randn((13, H), gen)
    w, ids = _routing(13, seed=11)
    out = moe_ffn(x, w, ids, ex, shared)
    assert rel_err(out, fused_moe_ref(x, w, ids, ex) + swiglu_mlp_ref(x, shared)) < REQUANT_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_ffn_shared_expert_on_a_side_stream_is_the_same_layer_and_captures():
    ex = _experts(seed=23)
    gen = torch.Generator().manual_seed(23)
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in ((256, H), (256, H), (H, 256)))
    shared = MlpWeights(g, gs, u, us, d, ds)
    x = randn((70, H), gen).bfloat16()
    w, ids = _routing(70, seed=23)
    plain = moe_ffn(x, w, ids, ex, shared, MoeConfig())
    side = MoeConfig(shared_stream=True)
    assert torch.equal(moe_ffn(x, w, ids, ex, shared, side), plain)
    out = torch.zeros_like(plain)
    moe_ffn(x, w, ids, ex, shared, side)  # compiled and warm before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(moe_ffn(x, w, ids, ex, shared, side))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, plain)


def test_fused_moe_names_bad_inputs():
    ex = _experts(seed=0)
    w, ids = _routing(4, seed=0)
    with pytest.raises(Step3Error, match="hidden size 200"):
        fused_moe(randn((4, 128), torch.Generator().manual_seed(0)), w, ids, ex)
    with pytest.raises(Step3Error, match="expert shapes disagree"):
        ExpertWeights(ex.gate, ex.up, ex.gate, ex.gate_scale, ex.up_scale, ex.down_scale)
    with pytest.raises(Step3Error, match="outside"):
        ExpertWeights(ex.gate, ex.up, ex.down, ex.gate_scale, ex.up_scale, ex.down_scale,
                      first=2, num_experts=E)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_moe_bf16_activations_on_gpu():
    ex = _experts(seed=5)
    x = randn((300, H), torch.Generator().manual_seed(5)).bfloat16()
    w, ids = _routing(300, seed=5)
    out = fused_moe(x, w, ids, ex)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < 1e-2


def _emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype):
    """torch._scaled_mm's blockwise (1x128 x 128x128) arithmetic in fp32."""
    x = act_dequant(Fp8Act(a, scale_a))
    w = dequantize_fp8(b.t(), scale_b.t())  # b = W^T [K, N]; scale_b = W's scales^T
    return (x @ w.t()).to(out_dtype)


@pytest.mark.parametrize("lo, hi", [(0, E), (2, 5)])
def test_cublas_path_groups_and_scatters_like_the_reference(monkeypatch, lo, hi):
    """The cuBLAS backend's sort / gather / per-expert GEMMs / weight folding / scatter, with
    _scaled_mm emulated (also on a GPU: these odd shapes are not cuBLAS's; the real one runs below)."""
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm, raising=False)
    ex = _experts(seed=13, lo=lo, hi=hi)
    x = randn((23, H), torch.Generator().manual_seed(13))
    w, ids = _routing(23, seed=13)
    out = cublas_moe(act_quant(x), w, ids, ex, torch.float32)
    assert rel_err(out, fused_moe_ref(x, w, ids, ex)) < (1e-3 if DEVICE.type == "cpu" else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_ffn_cublas_backend_on_gpu():
    gen = torch.Generator().manual_seed(17)
    shapes = ((E, 512, 512), (E, 512, 512), (E, 512, 512))  # K a multiple of 512: cuBLAS takes it
    (g, gs), (u, us), (d, ds) = (fp8_weight(s, gen) for s in shapes)
    ex = ExpertWeights(g, u, d, gs, us, ds)
    x = randn((300, 512), gen).bfloat16()
    w, ids = _routing(300, seed=17)
    ref = fused_moe_ref(x, w, ids, ex)
    for backend in ("cublas", "triton"):
        out = moe_ffn(x, w, ids, ex, None, MoeConfig(backend=backend))
        assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1.5e-2
