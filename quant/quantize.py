"""`step3 quantize`: an HF checkpoint or AFD layout -> the same kind of output, block-FP8 (or back to BF16).

Modes: `quantize` (BF16 input: every linear weight the naming table flags becomes E4M3 + a float32
weight_scale_inv per 128x128 block), `passthrough` (FP8 input: every tensor copied, same bytes),
`requantize` (FP8 input, --requantize: dequantized, then quantized again) and `dequantize`
(FP8 input, --dequantize: FP8 weights back to BF16, scales dropped). --skip REGEX leaves matching
weights exactly as stored.

This module only plans. Output tensors are placed exactly as `step3 convert` places them (HF:
whole tensors in size-capped shards; AFD: `converters.layout.plan_pieces` for the same FFN ranks,
so an FP8 weight's scale follows its weight and TP cuts must fall on 128 boundaries), and
converters/writer.py writes them: atomic files, checksums, --resume, bounded memory. A piece is
quantized on its own, which equals quantizing the whole tensor and cutting it, because experts are
independent and TP cuts are block-aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from converters.config import config_quantization
from converters.convert import DEFAULT_SHARD_SIZE, data_files, hf_index, hf_shards, run_fingerprint
from converters.errors import CheckpointError, Step3Error
from converters.hf import INDEX_FILE
from converters.layout import CONFIG, MANIFEST, Piece, SourceTensor, build_manifest, plan_pieces, shard_pieces
from converters.names import SCALE_SUFFIX, is_scale_name, name_matcher, scale_name, spec_table
from converters.slices import read_tensor
from converters.writer import (
    CopyFile,
    OutputPlan,
    ProgressFn,
    WriteResult,
    atomic_write,
    json_bytes,
    record_of,
    write_output,
)
from quant.backends import quantize_weight, resolve_backend, resolve_device
from quant.check import check_quantized
from quant.fp8 import FP8_DTYPE, dequantize_fp8, scale_grid_shape
from quant.record import KV_CACHE_DTYPES, quantization_record, with_quantization
from quant.report import REPORT_FILE, QuantReport
from quant.sources import QuantSource, open_source


@dataclass(frozen=True)
class QuantizeOptions:
    backend: str = "auto"  # auto | torch | te
    device: str | None = None  # where the torch backend computes (cpu, cuda, cuda:1)
    skip: str | None = None  # regex over HF names: leave those tensors as stored
    kv_cache: str | None = None  # fp8 | bf16, recorded for the runtime (default fp8 on FP8 output)
    requantize: bool = False
    dequantize: bool = False
    check: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE


@dataclass
class QuantizeResult:
    src: Path
    out: Path
    kind: str  # hf or afd
    mode: str
    backend: str | None
    write: WriteResult
    report: QuantReport


def _mode(source: QuantSource, o: QuantizeOptions) -> str:
    """The mode for this input and these flags; contradictory flags are named errors."""
    if o.kv_cache is not None and o.kv_cache not in KV_CACHE_DTYPES:
        raise Step3Error(f"--kv-cache {o.kv_cache!r}: use one of {', '.join(KV_CACHE_DTYPES)}")
    if o.dequantize:
        if o.requantize or o.skip or o.kv_cache:
            raise Step3Error("--dequantize writes BF16 and takes no --requantize, --skip or --kv-cache")
        if not source.is_fp8:
            raise Step3Error(f"{source.path}: holds no FP8 weights, nothing to --dequantize")
        return "dequantize"
    if source.is_fp8:
        return "requantize" if o.requantize else "passthrough"
    return "quantize"


def _actions(source: QuantSource, mode: str, skip) -> tuple[dict[str, str], list[str]]:
    """(HF weight name -> copy | quantize | dequantize, the BF16 weights --skip keeps from quantizing)."""
    specs, stored = spec_table(source.cfg, vision=source.has_vision), {t.name: t for t in source.tensors}
    out = {}
    for t in source.tensors:
        if is_scale_name(t.name):
            continue
        fp8 = scale_name(t.name) in stored
        if mode == "passthrough" or skip(t.name):
            out[t.name] = "copy"
        elif mode == "dequantize":
            out[t.name] = "dequantize" if fp8 else "copy"
        else:
            out[t.name] = "quantize" if specs[t.name].quantize else "copy"
    skipped = [n for n, a in out.items() if a == "copy" and mode != "passthrough" and skip(n)
               and specs[n].quantize and scale_name(n) not in stored]
    return out, skipped


def _out_tensors(source: QuantSource, actions: dict[str, str]) -> list[SourceTensor]:
    """The output's HF-level tensors (full shapes), in the input's order."""
    out = []
    for t in source.tensors:
        weight = t.name[: -len(SCALE_SUFFIX)] if is_scale_name(t.name) else t.name
        act = actions[weight]
        if act == "copy":
            out.append(t)
        elif act == "dequantize" and t.name == weight:
            out.append(SourceTensor(t.name, "BF16", t.shape))
        elif act == "quantize" and t.name == weight:
            out += [SourceTensor(t.name, "F8_E4M3", t.shape),
                    SourceTensor(scale_name(t.name), "F32", scale_grid_shape(t.shape))]
    return out


class _Pass:
    """Producers for the output pieces, a one-slot cache (a weight's scale is asked for right after it),
    and the report, filled as tensors are produced."""

    def __init__(self, source: QuantSource, actions: dict[str, str], backend: str | None,
                 device: torch.device, report: QuantReport):
        self.source, self.actions, self.backend, self.device = source, actions, backend, device
        self.report = report
        self.groups = {n: s.group for n, s in spec_table(source.cfg, vision=source.has_vision).items()}
        self._slot: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def values(self, key: str) -> torch.Tensor:
        """The input's values of a weight piece; FP8 dequantized to fp32 with its scale piece."""
        t = self.source.pieces[key].read()
        return dequantize_fp8(t, self.source.pieces[key + SCALE_SUFFIX].read()) if t.dtype == FP8_DTYPE else t

    def quantized(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._slot is None or self._slot[0] != key:
            self._slot = None  # drop the previous tensor before reading the next
            name = self.source.pieces[key].source
            w = self.values(key)
            q, s = quantize_weight(w, self.backend, name=name, device=self.device)
            self.report.add_error(key, self.groups[name], w, q, s)
            self._slot = (key, (q, s))
        return self._slot[1]

    def producer(self, p: Piece):
        weight_key = p.key[: -len(SCALE_SUFFIX)] if is_scale_name(p.source) else p.key
        inp = self.source.pieces.get(weight_key)
        if inp is None or (inp.slice != p.slice and not is_scale_name(p.source)):
            raise CheckpointError(f"{self.source.path}: {p.key} is placed differently in this layout than "
                                  f"step3 convert places it now; re-run step3 convert, then quantize")
        act = self.actions[inp.source]
        if act == "copy":
            return self.source.pieces[p.key].read
        if act == "dequantize":
            return lambda: self.values(weight_key).to(torch.bfloat16)
        return lambda: self.quantized(weight_key)[1 if is_scale_name(p.source) else 0]

    def count_bytes(self, pieces: list[Piece]) -> None:
        """Bytes before/after per group, for every output weight piece with its scale."""
        by_key = {p.key: p for p in pieces}
        for p in pieces:
            if is_scale_name(p.source):
                continue
            before = sum(x.nbytes for k in (p.key, p.key + SCALE_SUFFIX) if (x := self.source.pieces.get(k)))
            after = sum(x.nbytes for k in (p.key, p.key + SCALE_SUFFIX) if (x := by_key.get(k)))
            self.report.add_tensor(self.groups[p.source], before, after, self.actions[p.source] == "quantize")

    def measure_missing(self, out: Path, pieces: list[Piece]) -> None:
        """Error stats of quantized pieces written by an earlier, interrupted run (skipped on --resume)."""
        by_key = {p.key: p for p in pieces}
        for p in pieces:
            done = p.key in self.report.tensors
            if is_scale_name(p.source) or self.actions[p.source] != "quantize" or done:
                continue
            s = by_key[p.key + SCALE_SUFFIX]
            q, scale = read_tensor(out / p.file, p.source), read_tensor(out / s.file, s.source)
            self.report.add_error(p.key, self.groups[p.source], self.values(p.key), q, scale)


def _place(source: QuantSource, tensors: list[SourceTensor], shard_size: int) -> list[Piece]:
    """Output pieces and their files, as step3 convert would place them."""
    if source.kind == "hf":
        return hf_shards(tensors, shard_size)
    placed = plan_pieces(source.cfg, tensors, source.ffn_ranks, vision=source.has_vision)
    return shard_pieces(placed, shard_size)


def _record(source: QuantSource, mode: str, backend: str | None, o: QuantizeOptions, report: QuantReport):
    if mode == "dequantize":
        return None
    kv = o.kv_cache or "fp8"
    ignored = [n.removesuffix(".weight") for n in report.skipped]
    base = config_quantization(source.config) if mode == "passthrough" else None
    return quantization_record(backend=backend, kv_cache=kv, skip=o.skip, ignored=ignored, base=base)


def _finals(source: QuantSource, pieces: list[Piece], mode: str, backend: str | None, o: QuantizeOptions,
            report: QuantReport, run: _Pass, out: Path):
    def final(records):
        run.measure_missing(out, pieces)
        config = with_quantization(source.config, _record(source, mode, backend, o, report))
        config_bytes = json_bytes(config)
        report_bytes = json_bytes(report.to_json())
        if source.kind == "hf":
            index_bytes = json_bytes(hf_index(pieces))
            return [(INDEX_FILE, index_bytes), (REPORT_FILE, report_bytes), (CONFIG, config_bytes)]
        recs = {k: v.to_json() for k, v in records.items()} | {CONFIG: record_of(config_bytes).to_json()}
        manifest = build_manifest(config, source.cfg, source.attn_ranks, source.ffn_ranks,
                                  config.get("quantization_config"), pieces, recs)
        return [(REPORT_FILE, report_bytes), (CONFIG, config_bytes), (MANIFEST, json_bytes(manifest))]

    names = (INDEX_FILE, REPORT_FILE, CONFIG) if source.kind == "hf" else (REPORT_FILE, CONFIG, MANIFEST)
    return final, names


def quantize_checkpoint(src: str | Path, out: str | Path, options: QuantizeOptions = QuantizeOptions(), *,
                        resume: bool = False, force: bool = False,
                        progress: ProgressFn | None = None) -> QuantizeResult:
    """Quantize (or pass through, requantize, dequantize) `src` into `out`; see the module docstring."""
    src, out = Path(src), Path(out)
    if out.exists() and out.resolve() == src.resolve():
        raise Step3Error(f"{out}: OUT is the input itself; write the quantized model to another directory")
    source = open_source(src)
    mode = _mode(source, options)
    backend = resolve_backend(options.backend) if mode in ("quantize", "requantize") else None
    device = resolve_device(options.device)
    actions, skipped = _actions(source, mode, name_matcher(options.skip, "--skip"))
    report = QuantReport(mode, backend, skipped=skipped)
    run = _Pass(source, actions, backend, device, report)
    pieces = _place(source, _out_tensors(source, actions), options.shard_size)
    run.count_bytes(pieces)
    files = data_files(pieces, run.producer)
    copies = [CopyFile(rel, src / rel) for rel in source.copies]
    final, names = _finals(source, pieces, mode, backend, options, report, run, out)
    opts = f"mode={mode} skip={options.skip} kv={options.kv_cache} shard_size={options.shard_size}"
    fingerprint = run_fingerprint(f"quantize {source.kind}", src, source.inputs, opts)
    plan = OutputPlan((*files, *copies), final, fingerprint, names)
    result = write_output(out, plan, resume=resume, force=force, progress=progress)
    if options.check:
        report.check = check_quantized(src, out, device=str(device)).to_json()
        atomic_write(out / REPORT_FILE, json_bytes(report.to_json()))
    return QuantizeResult(src, out, source.kind, mode, backend, result, report)
