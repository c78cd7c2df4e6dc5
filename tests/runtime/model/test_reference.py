"""The reference model against independent formulations of the same math (fp32, fixed seeds)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from converters.config import Step3Config, get_preset
from converters.errors import CheckpointError, Step3Error
from converters.names import text_tensor_specs
from runtime.model import reference as ref
from runtime.model.reference import Step3Reference

TINY = get_preset("step3-tiny")


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Step3Reference:
    return Step3Reference(TINY, seed=3)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))


# ---- pieces ------------------------------------------------------------------------------------
def test_rmsnorm_matches_formula() -> None:
    x, w = randn(3, 5, 40, seed=1), randn(40, seed=2)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(ref.rmsnorm(x, w, 1e-5), expected)
    assert ref.rmsnorm(x.bfloat16(), w, 1e-5).dtype == torch.bfloat16


def test_rope_is_a_rotation_of_neox_pairs() -> None:
    D, T = 64, 11
    x, pos = randn(2, T, 3, D, seed=4), torch.arange(7, 7 + T)
    y = ref.apply_rope(x, pos, 10000.0)
    # Pairs (i, i + D/2) rotate by angle pos * theta^(-2i/D): norms are kept, angle is as stated.
    i = 5
    angle = pos.double() * 10000.0 ** (-2 * i / D)
    a, b = x[..., i].double(), x[..., i + D // 2].double()
    c, s = angle.cos()[None, :, None], angle.sin()[None, :, None]
    torch.testing.assert_close(y[..., i].double(), a * c - b * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., i + D // 2].double(), b * c + a * s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # Position 0 is the identity; a relative shift of both q and k keeps their dot product.
    torch.testing.assert_close(ref.apply_rope(x, torch.zeros(T), 10000.0), x)
    q, k = randn(1, 1, D, seed=5), randn(1, 1, D, seed=6)
    dots = [(ref.apply_rope(q, torch.tensor([p + 9]), 1e4) * ref.apply_rope(k, torch.tensor([p]), 1e4)).sum()
            for p in (0, 13)]
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,S", [(7, 7), (1, 12), (3, 10)])
def test_mfa_equals_sdpa_with_kv_repeated_per_head(T: int, S: int) -> None:
    B, heads, D = 2, 5, 24
    q, k, v = randn(B, T, heads, D, seed=7), randn(B, S, D, seed=8), randn(B, S, D, seed=9)
    ours = ref.mfa_attention(q, k, v)  # [B, T, heads, D]
    k_rep = k[:, None].expand(B, heads, S, D)  # every head gets the same K/V
    v_rep = v[:, None].expand(B, heads, S, D)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)  # query t sees keys <= S - T + t
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k_rep, v_rep, attn_mask=mask)
    torch.testing.assert_close(ours, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def _moe_per_token(x, router, gate, up, down, top_k, norm):
    """The MoE written the slow, obvious way: one token, one chosen expert at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(router @ x[n], dim=0)
        chosen = sorted(range(router.shape[0]), key=lambda e: -probs[e].item())[:top_k]
        total = sum(probs[e] for e in chosen) if norm else 1.0
        for e in chosen:
            h = F.silu(gate[e] @ x[n]) * (up[e] @ x[n])
            out[n] += probs[e] / total * (down[e] @ h)
    return out


def _moe_weights(E: int = 6, H: int = 32, Ie: int = 20, seed: int = 10):
    return (randn(E, H, seed=seed) / H**0.5, randn(E, Ie, H, seed=seed + 1) / H**0.5,
            randn(E, Ie, H, seed=seed + 2) / H**0.5, randn(E, H, Ie, seed=seed + 3) / Ie**0.5)


@pytest.mark.parametrize("norm", [False, True])
def test_moe_equals_per_token_loop(norm: bool) -> None:
    x, (router, gate, up, down) = randn(13, 32, seed=11), _moe_weights()
    ours = ref.moe(x, router, gate, up, down, top_k=3, norm_expert_weight=norm)
    torch.testing.assert_close(ours, _moe_per_token(x, router, gate, up, down, 3, norm), rtol=1e-5, atol=1e-5)


def test_norm_expert_weight_renormalizes() -> None:
    x, (router, *_) = randn(17, 32, seed=12), _moe_weights()
    raw, ids = ref.route(x, router, 3, norm_expert_weight=False)
    normed, ids2 = ref.route(x, router, 3, norm_expert_weight=True)
    assert torch.equal(ids, ids2)
    assert (raw.sum(-1) < 1 - 1e-3).all()  # 3 of 6 softmax weights: never the whole mass here
    torch.testing.assert_close(normed.sum(-1), torch.ones(17))
    torch.testing.assert_close(normed, raw / raw.sum(-1, keepdim=True))


def test_moe_invariant_under_expert_permutation() -> None:
    x, (router, gate, up, down) = randn(19, 32, seed=13), _moe_weights()
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(14))
    base = ref.moe(x, router, gate, up, down, 3, False)
    permuted = ref.moe(x, router[perm], gate[perm], up[perm], down[perm], 3, False)
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-5)
    # ...but permuting the experts alone (router rows kept) changes the output.
    assert not torch.allclose(ref.moe(x, router, gate[perm], up[perm], down[perm], 3, False), base, atol=1e-3)


# ---- the whole model ---------------------------------------------------------------------------
def test_parameters_are_the_tensor_table(model: Step3Reference) -> None:
    ours = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert ours == {s.name: s.shape for s in text_tensor_specs(TINY)}


def _step3_md_forward(w: dict[str, torch.Tensor], cfg, ids: torch.Tensor) -> torch.Tensor:
    """STEP3.md section 3 transcribed literally for one sequence, loops instead of batched ops, RoPE as
    complex rotation of the pairs (i, i + D/2): an independent check of how the pieces are wired."""
    T, D, heads = ids.shape[0], cfg.head_dim, cfg.num_attention_heads

    def norm(x, g):
        return g * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    angle = torch.arange(T, dtype=torch.float64)[:, None] * cfg.rope_theta ** (
        -torch.arange(0, D, 2, dtype=torch.float64) / D)  # [T, D/2]

    def rope(x):  # [T, ..., D]
        z = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double())
        a = angle.view(T, *[1] * (x.dim() - 2), D // 2)
        z = z * torch.polar(torch.ones_like(a), a)
        return torch.cat([z.real, z.imag], dim=-1).float()

    def swiglu(h, p):
        gate, up, down = (w[p + n + "_proj.weight"] for n in ("gate", "up", "down"))
        return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = norm(x, w[p + "input_layernorm.weight"])
        q_lat = norm(h @ w[a + "q_proj.weight"].T, w[a + "inter_norm.weight"])
        q = rope((q_lat @ w[a + "wq.weight"].T).view(T, heads, D))
        k, v = rope(h @ w[a + "k_proj.weight"].T), h @ w[a + "v_proj.weight"].T
        o = torch.stack([torch.stack([torch.softmax(k[: t + 1] @ q[t, j] / D**0.5, 0) @ v[: t + 1]
                                      for j in range(heads)]) for t in range(T)])  # [T, heads, D]
        x = x + o.reshape(T, heads * D) @ w[a + "o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        if cfg.is_moe_layer(i):
            m = p + "moe."
            experts = (w[m + n + "_proj.weight"] for n in ("gate", "up", "down"))
            routed = _moe_per_token(h, w[m + "gate.weight"], *experts, cfg.moe_top_k, cfg.norm_expert_weight)
            x = x + routed + swiglu(h, p + "share_expert.")
        else:
            x = x + swiglu(h, p + "mlp.")
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("norm_expert_weight", [False, True])
def test_model_equals_step3_md_transcription(model: Step3Reference, prompt: torch.Tensor,
                                             norm_expert_weight: bool) -> None:
    cfg = TINY.replace(norm_expert_weight=norm_expert_weight)
    weights = dict(model.named_parameters())
    ours = Step3Reference(cfg, weights)(prompt[:1])[0]  # [T, V]
    torch.testing.assert_close(ours, _step3_md_forward(weights, cfg, prompt[0]), rtol=1e-4, atol=1e-4)


def test_full_forward_equals_step_by_step_with_cache(model: Step3Reference, prompt: torch.Tensor) -> None:
    full = model(prompt)  # [B, T, V]
    cache = model.new_cache(prompt.shape[0], prompt.shape[1])
    first = model(prompt[:, :4], cache)  # a 4-token prefill, then one token at a time
    steps = [model(prompt[:, t : t + 1], cache) for t in range(4, prompt.shape[1])]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == prompt.shape[1]


def test_causal_prefix_logits_do_not_see_the_future(model: Step3Reference, prompt: torch.Tensor) -> None:
    changed = prompt.clone()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab_size
    a, b = model(prompt), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_generate_equals_argmax_of_full_recompute(model: Step3Reference, prompt: torch.Tensor) -> None:
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, prompt.shape[1] + 6) and torch.equal(out[:, : prompt.shape[1]], prompt)
    for t in range(prompt.shape[1], out.shape[1]):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1)), f"step {t}"


def test_generate_stops_at_eos_and_pads_finished_rows(model: Step3Reference, prompt: torch.Tensor) -> None:
    free = model.generate(prompt, max_new_tokens=5)
    T = prompt.shape[1]
    eos = int(free[0, T + 1])  # row 0 emits it at its second new token
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=eos)
    assert torch.equal(out[0, T : T + 2], free[0, T : T + 2])
    assert (out[0, T + 1 :] == eos).all()
    row1 = free[1, T:].tolist()
    if eos not in row1:  # row 1 never finishes: the run goes to the end with row 1 untouched
        assert torch.equal(out[1], free[1])
    # Several stop ids (EOS, end of turn): each row stops at its first; then it is padded with stops[0].
    stops = [int(free[0, T + 2]), int(free[1, T])]
    both = model.generate(prompt, max_new_tokens=5, eos_token_id=stops)
    ends = [next(j for j in range(T, T + 5) if int(free[r, j]) in stops) for r in range(2)]
    assert both.shape[1] == max(ends) + 1
    for r, end in enumerate(ends):
        assert torch.equal(both[r, : end + 1], free[r, : end + 1])
        assert (both[r, end + 1 :] == stops[0]).all()


def test_model_in_bf16_tracks_fp32(model: Step3Reference, prompt: torch.Tensor) -> None:
    weights = dict(model.named_parameters())
    bf16 = Step3Reference(TINY, weights, dtype=torch.bfloat16)
    a, b = model(prompt).flatten(), bf16(prompt).float().flatten()
    assert F.cosine_similarity(a, b, dim=0) > 0.99


def test_bad_input_ids_and_missing_tensors_are_named(model: Step3Reference) -> None:
    with pytest.raises(Step3Error, match="vocab_size"):
        model(torch.tensor([[0, TINY.vocab_size]]))
    with pytest.raises(Step3Error, match="int64"):
        model(torch.zeros(3, dtype=torch.long))
    weights = dict(model.named_parameters())
    del weights["model.layers.2.moe.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.moe\.up_proj\.weight"):
        Step3Reference(TINY, weights)
    fp8 = {**dict(model.named_parameters()), "lm_head.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match="lm_head.weight_scale_inv is missing"):
        Step3Reference(TINY, fp8)
    weights = dict(model.named_parameters())
    weights["model.norm.weight"] = weights["model.norm.weight"][:-1]
    with pytest.raises(CheckpointError, match="model.norm.weight has shape"):
        Step3Reference(TINY, weights)


# ---- real checkpoints (synthetic, HF layout) -----------------------------------------------------
def test_from_pretrained_loads_every_tensor_as_stored(tiny_ckpt) -> None:
    from safetensors.torch import load_file

    stored = {}
    for shard in sorted(tiny_ckpt.glob("*.safetensors")):
        stored.update(load_file(shard))
    seen: list[tuple[int, int, str]] = []
    loaded = Step3Reference.from_pretrained(tiny_ckpt, progress=lambda *a: seen.append(a))
    assert loaded.cfg == Step3Config.from_pretrained(tiny_ckpt)
    total = sum(p.numel() * 4 for p in loaded.parameters())  # fp32
    assert [s[2] for s in seen] == [s.name for s in text_tensor_specs(loaded.cfg)]
    done = [s[0] for s in seen]
    assert done == sorted(set(done)) and seen[-1][:2] == (total, total)  # rising to the total
    for name, p in loaded.named_parameters():
        assert torch.equal(p, stored[name].float()), name
    ids = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    logits = loaded(ids)
    assert logits.std() > 1 and logits[0].argmax(-1).unique().numel() > 3  # informative, not constant


def test_fp8_checkpoint_is_within_fp8_error_of_its_bf16_twin(tiny_ckpt, tiny_fp8_ckpt) -> None:
    bf16, fp8 = Step3Reference.from_pretrained(tiny_ckpt), Step3Reference.from_pretrained(tiny_fp8_ckpt)
    quantized = {s.name for s in text_tensor_specs(TINY) if s.quantize}
    for (name, a), (_, b) in zip(bf16.named_parameters(), fp8.named_parameters(), strict=True):
        if name in quantized:
            rel = (a - b).norm() / a.norm()
            assert 0 < rel < 0.05, (name, rel)  # quantized: changed, but only by E4M3 rounding
        else:
            assert torch.equal(a, b), name  # router, embeddings, lm_head and norms stay exact
    ids = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    a, b = bf16(ids), fp8(ids)
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_from_pretrained_names_missing_and_misshapen_tensors(make_ckpt, tmp_path) -> None:
    ckpt = make_ckpt()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["share_expert_dim"] += 128  # the config now disagrees with the stored tensors
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"share_expert\.gate_proj\.weight has shape"):
        Step3Reference.from_pretrained(ckpt)
    with pytest.raises(Step3Error, match="config.json"):
        Step3Reference.from_pretrained(tmp_path / "nowhere")
