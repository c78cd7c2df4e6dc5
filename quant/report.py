"""What quantization did to each tensor group: counts, relative error, SNR, bytes before and after.

Filled one tensor at a time while `quant.quantize` writes (so memory stays at one tensor), and written
into OUT as `quantize-report.json`. Error is measured against the input's own values (for FP8 input
under --requantize: its dequantized weights):
    relative error of a tensor = ||W_q - W||_F / ||W||_F      (W_q = dequantized FP8)
    group SNR (dB)             = 10 log10(sum ||W||^2 / sum ||W_q - W||^2) over the group's tensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from quant.fp8 import dequantize_fp8

REPORT_FILE = "quantize-report.json"


@dataclass
class GroupStats:
    """One tensor group (attention, routed_experts, norm, ...): sums, so files can arrive in any order."""

    tensors: int = 0
    quantized: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rel_errors: list[float] = field(default_factory=list)
    signal: float = 0.0  # sum ||W||^2 of the quantized tensors
    noise: float = 0.0  # sum ||W_q - W||^2

    @property
    def mean_rel_error(self) -> float | None:
        return sum(self.rel_errors) / len(self.rel_errors) if self.rel_errors else None

    @property
    def max_rel_error(self) -> float | None:
        return max(self.rel_errors) if self.rel_errors else None

    @property
    def snr_db(self) -> float | None:
        if not self.rel_errors:
            return None
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)

    def to_json(self) -> dict[str, Any]:
        snr = self.snr_db
        return {"tensors": self.tensors, "quantized": self.quantized, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "mean_rel_error": self.mean_rel_error,
                "max_rel_error": self.max_rel_error,
                "snr_db": None if snr is None or math.isinf(snr) else snr}


def error_stats(w: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> tuple[float, float]:
    """(||W||^2, ||W_q - W||^2), W_q the dequantized (q, scale_inv); one matrix (expert) at a time, so the
    extra memory is a few fp32 copies of one matrix, not of a whole 3-D expert tensor."""
    if w.dim() > 2:
        parts = [error_stats(w[i], q[i], scale_inv[i]) for i in range(w.shape[0])]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    w32 = w.float().reshape(-1)
    diff = dequantize_fp8(q, scale_inv).reshape(-1).sub_(w32)
    return float(torch.dot(w32, w32)), float(torch.dot(diff, diff))


@dataclass
class QuantReport:
    """The whole run: mode, backend, one GroupStats per group, and each quantized tensor's error."""

    mode: str  # quantize, requantize, passthrough, dequantize
    backend: str | None
    groups: dict[str, GroupStats] = field(default_factory=dict)
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # quantizable weights left as stored (--skip)
    check: dict[str, Any] | None = None

    def _group(self, group: str) -> GroupStats:
        return self.groups.setdefault(group, GroupStats())

    def add_tensor(self, group: str, bytes_before: int, bytes_after: int, quantized: bool = False) -> None:
        """Count one source tensor (its scale, if any, is counted in its bytes)."""
        g = self._group(group)
        g.tensors += 1
        g.quantized += quantized
        g.bytes_before += bytes_before
        g.bytes_after += bytes_after

    def add_error(self, name: str, group: str, w: torch.Tensor, q: torch.Tensor,
                  scale_inv: torch.Tensor) -> None:
        """Measure one quantized tensor (once: a re-measure after --resume is ignored)."""
        if name in self.tensors:
            return
        signal, noise = error_stats(w, q, scale_inv)
        rel = math.sqrt(noise / signal) if signal > 0 else 0.0
        g = self._group(group)
        g.rel_errors.append(rel)
        g.signal += signal
        g.noise += noise
        self.tensors[name] = {"group": group, "rel_error": rel,
                              "snr_db": 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None}

    @property
    def total(self) -> GroupStats:
        t = GroupStats()
        for g in self.groups.values():
            t.tensors += g.tensors
            t.quantized += g.quantized
            t.bytes_before += g.bytes_before
            t.bytes_after += g.bytes_after
            t.rel_errors += g.rel_errors
            t.signal += g.signal
            t.noise += g.noise
        return t

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "backend": self.backend,
                "groups": {k: v.to_json() for k, v in sorted(self.groups.items())},
                "total": self.total.to_json(), "skipped": self.skipped, "check": self.check,
                "tensors": dict(sorted(self.tensors.items()))}
