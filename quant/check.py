"""`step3 quantize --check`: does the quantized checkpoint still compute the same model?

Runs the reference model (runtime/model/reference.py, fp32) over a few seeded random prompts with the
original weights, then with the quantized ones (dequantized on load), and compares the logits at
every position: cosine similarity over the vocabulary and top-1 (argmax) agreement. One model is in
memory at a time. The bar (issue 4): mean cosine >= 0.99 on step3-tiny and step3-small.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

COSINE_BAR = 0.99


@dataclass(frozen=True)
class CheckResult:
    prompts: int
    tokens_per_prompt: int
    cosine_mean: float
    cosine_min: float
    top1_agreement: float
    threshold: float

    @property
    def passed(self) -> bool:
        return self.cosine_mean >= self.threshold

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}


def check_prompts(vocab_size: int, prompts: int, length: int, seed: int) -> torch.Tensor:
    """[prompts, length] token ids drawn uniformly from the vocabulary with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (prompts, length), generator=gen)


def _logits(path: Path, ids: torch.Tensor | None, device: str, seed: int, prompts: int,
            length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logits [B, T, V] on the CPU) of the checkpoint at `path`; ids drawn when None."""
    from runtime.model.reference import Step3Reference  # the runtime is only needed for --check

    model = Step3Reference.from_pretrained(path, dtype=torch.float32, device=device)
    if ids is None:
        ids = check_prompts(model.cfg.vocab_size, prompts, length, seed)
    logits = model(ids.to(device)).float().cpu()
    del model
    gc.collect()
    return ids, logits


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: (cosine over the vocabulary, argmax equal) for logits [..., V]."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return cos, a.argmax(-1) == b.argmax(-1)


def check_quantized(original: str | Path, quantized: str | Path, *, prompts: int = 4, length: int = 32,
                    seed: int = 0, device: str = "cpu", threshold: float = COSINE_BAR) -> CheckResult:
    """Logits of `quantized` against `original` (HF checkpoints or AFD layouts) on seeded prompts."""
    ids, ref = _logits(Path(original), None, device, seed, prompts, length)
    _, got = _logits(Path(quantized), ids, device, seed, prompts, length)
    cos, same = compare_logits(ref, got)
    return CheckResult(prompts, length, float(cos.mean()), float(cos.min()), float(same.float().mean()),
                       threshold)
