"""HF checkpoint -> AFD layout, and back (`step3 convert`, `step3 convert --to hf`).

Both directions only plan: which tensor (or slice) goes to which file, which files are copied, and
the JSON written last. converters/writer.py does the writing (atomic files, checksums, resume, disk
space, bounded memory), converters/slices.py the reading (one tensor or slice at a time, no mmap).
Neither imports torch: converting only moves bytes (numpy arrays of raw bits, or byte ranges).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from converters.afd import AFDLayout
from converters.config import config_quantization
from converters.errors import Step3Error
from converters.hf import INDEX_FILE, HFCheckpoint
from converters.layout import (
    CONFIG,
    MANIFEST,
    Piece,
    SourceTensor,
    build_manifest,
    check_ranks,
    ordered_tensors,
    plan_pieces,
    shard_pieces,
)
from converters.names import FP8_QUANT_CONFIG
from converters.slices import read_piece
from converters.writer import (
    PARTIAL,
    CopyFile,
    OutputPlan,
    ProgressFn,
    SafetensorsFile,
    TensorOut,
    WriteResult,
    json_bytes,
    record_of,
    write_output,
)

DEFAULT_SHARD_SIZE = 4_000_000_000
_NOT_COPIED = (".safetensors", PARTIAL, ".tmp", ".bin", ".pt", ".pth")


@dataclass
class ConvertResult:
    out: Path
    direction: str  # "hf->afd" or "afd->hf"
    write: WriteResult
    bytes_by_part: dict[str, int]  # "attention", "ffn/rank-0", ..., "vision", "top level"
    files_by_part: dict[str, int]


def extra_files(src: Path, skip: tuple[str, ...]) -> list[str]:
    """Top-level files copied verbatim (tokenizer, chat template, generation config), sorted."""
    return sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name not in skip and not p.name.endswith(_NOT_COPIED))


def source_tensors(ckpt: HFCheckpoint) -> list[SourceTensor]:
    """The checkpoint's tensors in naming-table order, each FP8 scale right after its weight."""
    facts = {n: (i.dtype, i.shape) for n in ckpt.weight_map for i in [ckpt.info(n)]}
    return ordered_tensors(ckpt.config, ckpt.has_vision, facts)


def run_fingerprint(direction: str, src: Path, files: list[Path], options: str) -> str:
    """The inputs (name, size, mtime of each of `files`) and options of a run, for OutputPlan.fingerprint:
    --resume refuses to continue a run made from other inputs or options. Shared with step3 quantize."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{direction} {src.resolve()} {options} sources={h.hexdigest()[:16]}"


def data_files(pieces: list[Piece], open_source: Callable[[Piece], Callable]) -> list[SafetensorsFile]:
    """Group planned pieces by output file, in order; `open_source(piece)` gives each tensor's producer.
    Shared with step3 quantize, so both commands write the same files for the same placement."""
    by_file: dict[str, list[TensorOut]] = {}
    for p in pieces:
        out = TensorOut(p.source, p.dtype, p.shape, open_source(p))
        by_file.setdefault(p.file, []).append(out)
    return [SafetensorsFile(f, tuple(ts), {"format": "pt"}) for f, ts in by_file.items()]


def _tally(result: WriteResult) -> tuple[dict[str, int], dict[str, int]]:
    size: dict[str, int] = {}
    count: dict[str, int] = {}
    for rel, rec in result.records.items():
        part = rel.rsplit("/", 1)[0] if "/" in rel else "top level"
        size[part] = size.get(part, 0) + rec.bytes
        count[part] = count.get(part, 0) + 1
    return size, count


def quantization_of(config: dict, is_fp8: bool) -> dict | None:
    """The manifest's quantization record: config.json's, or the step3-fp8 default for an FP8 checkpoint
    whose config.json has none; None for a BF16 checkpoint."""
    if not is_fp8:
        return None
    return config_quantization(config) or dict(FP8_QUANT_CONFIG)


def _distinct(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise Step3Error(f"{out}: the output directory is the input directory; choose another OUT")


def hf_to_afd(src: str | Path, out: str | Path, *, ffn_ranks: int, attn_ranks: int = 1,
              shard_size: int = DEFAULT_SHARD_SIZE, resume: bool = False, force: bool = False,
              progress: ProgressFn | None = None) -> ConvertResult:
    """Convert an HF Step-3 checkpoint (BF16 or block FP8, with or without vision) to an AFD layout."""
    src, out = Path(src), Path(out)
    _distinct(src, out)
    with HFCheckpoint(src) as ckpt:
        ckpt.validate()  # every problem listed at once, before anything is written
        check_ranks(ckpt.config, ffn_ranks, attn_ranks)
        placed = plan_pieces(ckpt.config, source_tensors(ckpt), ffn_ranks, vision=ckpt.has_vision)
        pieces = shard_pieces(placed, shard_size)
        shard_of = {n: ckpt.path / ckpt.info(n).file for n in ckpt.weight_map}
        config_bytes = (src / CONFIG).read_bytes()
        config = json.loads(config_bytes)
        quantization = quantization_of(config, ckpt.is_fp8)
        copies = [CopyFile(n, src / n) for n in extra_files(src, (CONFIG, INDEX_FILE))]
        files = data_files(pieces, lambda p: partial(read_piece, shard_of[p.source], p.source, p.slice))

        def final(records):
            recs = {k: v.to_json() for k, v in records.items()} | {CONFIG: record_of(config_bytes).to_json()}
            manifest = build_manifest(config, ckpt.config, attn_ranks, ffn_ranks, quantization, pieces, recs)
            return [(CONFIG, config_bytes), (MANIFEST, json_bytes(manifest))]

        options = f"ffn_ranks={ffn_ranks} attn_ranks={attn_ranks} shard_size={shard_size}"
        fingerprint = run_fingerprint("hf->afd", src, [*set(shard_of.values()), src / CONFIG], options)
        plan = OutputPlan((*files, *copies), final, fingerprint, (CONFIG, MANIFEST))
        result = write_output(out, plan, resume=resume, force=force, progress=progress)
    return ConvertResult(out, "hf->afd", result, *_tally(result))


def hf_shards(tensors: list[SourceTensor], shard_size: int) -> list[Piece]:
    """Tensors, whole, packed in order into model-0000i-of-0000N.safetensors (the HF checkpoint layout)."""
    return shard_pieces([("", Piece(t.name, "", t.name, t.dtype, t.shape, ())) for t in tensors], shard_size)


def hf_index(pieces: list[Piece]) -> dict:
    """model.safetensors.index.json for whole-tensor pieces (see hf_shards)."""
    return {"metadata": {"total_size": sum(p.nbytes for p in pieces)},
            "weight_map": {p.source: p.file for p in pieces}}


def afd_to_hf(src: str | Path, out: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, resume: bool = False,
              force: bool = False, progress: ProgressFn | None = None) -> ConvertResult:
    """Rebuild the HF checkpoint from an AFD layout: same tensor names, dtypes and bytes, same config.json."""
    src, out = Path(src), Path(out)
    _distinct(src, out)
    layout = AFDLayout(src)
    view = layout.hf_view()
    tensors = [SourceTensor(n, i.dtype, i.shape) for n in view.names() for i in [view.info(n)]]
    pieces = hf_shards(tensors, shard_size)
    files = data_files(pieces, lambda p: partial(view.get_array, p.source))
    copied = [rel for rel in layout.files if "/" not in rel and rel != CONFIG]
    copies = [CopyFile(rel, src / rel) for rel in sorted(copied)]
    config_bytes = (src / CONFIG).read_bytes()

    def final(records):
        return [(CONFIG, config_bytes), (INDEX_FILE, json_bytes(hf_index(pieces)))]

    layout_files = [src / MANIFEST, *(src / rel for rel in layout.files)]
    fingerprint = run_fingerprint("afd->hf", src, layout_files, f"shard_size={shard_size}")
    plan = OutputPlan((*files, *copies), final, fingerprint, (CONFIG, INDEX_FILE))
    result = write_output(out, plan, resume=resume, force=force, progress=progress)
    return ConvertResult(out, "afd->hf", result, *_tally(result))

