"""`step3 demo`: the whole toolchain on a synthetic step3-tiny, step by step, in seconds on a CPU.

The demo is a list of steps (STEPS). Each step is a function of the shared DemoState that does one
thing through the library (synthesize, inspect, load, chat, ...) and returns the facts worth showing
as {label: text}. Adding a step is one line in STEPS plus its function; the CLI renders whatever the
steps report, in order, as they finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from converters.config import Step3Config, get_preset
from converters.errors import Step3Error
from converters.hf import HFCheckpoint
from converters.summary import summarize
from converters.synth import synthesize
from quant.check import check_quantized
from runtime.chat import ChatTokenizer
from runtime.model.reference import ProgressFn, Step3Reference

PRESET = "step3-tiny"
DEFAULT_PROMPT = "In one sentence: what does MFA attention share across heads?"


@dataclass
class DemoState:
    """What the steps share: the inputs, then what earlier steps produced."""

    workdir: Path
    prompt: str
    max_new_tokens: int
    progress: ProgressFn | None = None
    checkpoint: Path | None = None
    quantized: Path | None = None  # the FP8 copy the later steps load
    layout: Path | None = None  # the AFD layout converted from it, which the load step reads
    model: Step3Reference | None = None
    tokenizer: ChatTokenizer | None = None
    reply: str = ""


@dataclass(frozen=True)
class StepReport:
    name: str
    title: str
    facts: dict[str, str]
    seconds: float


@dataclass
class DemoResult:
    steps: list[StepReport] = field(default_factory=list)
    reply: str = ""


def _same_model(written: Step3Config, preset: Step3Config) -> bool:
    """The synthesizer rewrites the special-token ids to its tokenizer's; everything else must match."""
    ids = {"bos_token_id": preset.bos_token_id, "eos_token_id": preset.eos_token_id,
           "image_token_id": preset.image_token_id}
    return written.replace(**ids) == preset


def _reusable(path: Path, preset: Step3Config) -> bool:
    """True when `path` holds a complete, valid checkpoint of the preset (a past demo run); raise if it
    holds something else, so the demo never overwrites a user's files."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return False
    try:
        with HFCheckpoint(path) as ckpt:
            ckpt.validate()
            ok = _same_model(ckpt.config, preset) and (path / "tokenizer.json").is_file()
            problem = "" if ok else f"it is not the {PRESET} checkpoint"
    except Step3Error as e:
        problem = str(e).splitlines()[0]
    if problem:
        raise Step3Error(f"{path}: exists but is not a valid {PRESET} demo checkpoint ({problem}); choose "
                         f"another --workdir or remove it")
    return True


def step_synthesize(state: DemoState) -> dict[str, str]:
    state.checkpoint = state.workdir / "hf"
    preset = get_preset(PRESET)
    if _reusable(state.checkpoint, preset):
        return {"checkpoint": str(state.checkpoint), "action": "reused (valid, from an earlier run)"}
    synthesize(state.checkpoint, preset, seed=0, progress=state.progress)
    return {"checkpoint": str(state.checkpoint),
            "action": f"synthesized {PRESET}: random BF16 weights, real names, shapes, tokenizer, template"}


def step_inspect(state: DemoState) -> dict[str, str]:
    assert state.checkpoint is not None, "the synthesize step runs first"
    s = summarize(state.checkpoint, context=4096)
    cfg, src = s.source.config, s.source
    return {
        "layers": f"{cfg.num_hidden_layers} ({len(cfg.dense_layers)} dense, {len(cfg.moe_layers)} MoE)",
        "attention": f"MFA: {cfg.num_attention_heads} query heads x {cfg.head_dim}, ONE shared K/V head",
        "MoE": f"{cfg.moe_num_experts} experts, top-{cfg.moe_top_k}, + 1 shared expert",
        "parameters": f"{s.params['total']:,} total, {s.params['active']:,} active per token",
        "stored": f"{src.stored_bytes:,} bytes in {src.files} file(s)",
        "KV cache per token": f"{s.kv_bytes_per_token['bf16']:,} B in BF16, {s.kv_bytes_per_token['fp8']:,} "
                              f"B in FP8 (all {cfg.num_hidden_layers} layers)",
    }


def step_quantize(state: DemoState) -> dict[str, str]:
    assert state.checkpoint is not None, "the synthesize step runs first"
    from quant.quantize import QuantizeOptions, quantize_checkpoint

    state.quantized = state.workdir / "fp8"
    r = quantize_checkpoint(state.checkpoint, state.quantized, QuantizeOptions(backend="torch"), force=True,
                            progress=state.progress)
    total = r.report.total
    c = check_quantized(state.checkpoint, state.quantized, prompts=2, length=16)
    return {"checkpoint": str(state.quantized),
            "weights": f"{total.quantized} of {total.tensors} tensors to block FP8 (E4M3, 128x128 scales); "
                       f"routers, embeddings, lm_head and norms stay BF16",
            "bytes": f"{total.bytes_before:,} -> {total.bytes_after:,}",
            "error": f"mean relative error {total.mean_rel_error:.2%}, SNR {total.snr_db:.1f} dB",
            "check": f"logits cosine {c.cosine_mean:.5f} (min {c.cosine_min:.5f}), top-1 agreement "
                     f"{c.top1_agreement:.0%} vs BF16"}


def step_convert(state: DemoState) -> dict[str, str]:
    assert state.checkpoint is not None, "the synthesize step runs first"
    from converters.convert import hf_to_afd
    from converters.verify import verify_layout

    source, state.layout = state.quantized or state.checkpoint, state.workdir / "afd"
    r = hf_to_afd(source, state.layout, ffn_ranks=2, force=True, progress=state.progress)
    check = verify_layout(state.layout, against=source)
    if not check.ok:
        raise Step3Error(f"{state.layout}: verify found problems: {check.problems[:3]}")
    parts = ", ".join(f"{part} {n:,} B" for part, n in sorted(r.bytes_by_part.items()))
    per = get_preset(PRESET).moe_num_experts // 2
    return {"layout": str(state.layout), "parts": parts,
            "plan": f"attention/ once for all DP attention ranks; ffn/rank-K: experts {per}K..{per}K+"
                    f"{per - 1} (EP) and half of every dense/shared MLP (TP)",
            "verify": f"{check.files} file checksums OK; {check.tensors} tensors bit-equal to their source"}


def step_load(state: DemoState) -> dict[str, str]:
    assert state.checkpoint is not None, "the synthesize step runs first"
    weights = state.layout or state.quantized or state.checkpoint
    state.tokenizer = ChatTokenizer.from_pretrained(weights)
    state.model = Step3Reference.from_pretrained(weights, dtype=torch.float32)
    tok = state.tokenizer
    return {"model": "runtime/model/reference.py (eager PyTorch, fp32, CPU)",
            "weights": f"{weights} ({'FP8, dequantized on load' if state.quantized else 'BF16'})",
            "tokenizer": f"{tok.vocab_size:,} tokens; stop ids {list(tok.stop_token_ids)}"}


def step_chat(state: DemoState) -> dict[str, str]:
    assert state.model is not None and state.tokenizer is not None, "the load step runs first"
    tok = state.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": state.prompt}])
    ids = tok.encode(prompt)
    start = time.perf_counter()
    out = state.model.generate(torch.tensor([ids]), state.max_new_tokens,
                               eos_token_id=list(tok.stop_token_ids))
    seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    state.reply = tok.decode(new, skip_special_tokens=True)
    return {"chat template": repr(prompt), "prompt tokens": str(len(ids)),
            "generated": f"{len(new)} tokens, greedy with a KV cache, {len(new) / seconds:.1f} tokens/s",
            "reply": repr(state.reply),
            "note": "the weights are random, so the reply is noise: exactly what this model computes"}


# The demo, in order: (name, title, function). Add a step here.
STEPS: list[tuple[str, str, Callable[[DemoState], dict[str, str]]]] = [
    ("synthesize", f"Synthesize a {PRESET} checkpoint (HF layout)", step_synthesize),
    ("inspect", "Inspect it", step_inspect),
    ("quantize", "Quantize it to block FP8 (step3 quantize) and check the logits", step_quantize),
    ("convert", "Convert it to the AFD layout over 2 FFN ranks (step3 convert) and verify it", step_convert),
    ("load", "Load the reference model and the tokenizer", step_load),
    ("chat", "Chat: template -> tokens -> greedy generation -> text", step_chat),
]


def run_demo(workdir: str | Path, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
             on_step: Callable[[StepReport], None] | None = None,
             progress: ProgressFn | None = None) -> DemoResult:
    """Run every step of STEPS in `workdir`; `on_step` sees each report as soon as its step finishes."""
    if max_new_tokens < 1:
        raise Step3Error(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompt.strip():
        raise Step3Error("--prompt must not be empty")
    state = DemoState(Path(workdir), prompt, max_new_tokens, progress)
    result = DemoResult()
    for name, title, step in STEPS:
        start = time.perf_counter()
        report = StepReport(name, title, step(state), time.perf_counter() - start)
        result.steps.append(report)
        if on_step is not None:
            on_step(report)
    result.reply = state.reply
    return result
