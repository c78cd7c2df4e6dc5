"""`step3 verify`: is an AFD layout intact, and (with a source) equal to the checkpoint it came from?

Three kinds of checks, each problem reported by name (file or tensor):
- files: every file the manifest lists exists with its recorded size and sha256, and no tensor
  file lies in the layout that the manifest does not list;
- manifest: it agrees with itself and with the files: config.json matches, every tensor's header
  entry (dtype, shape) matches, the slices tile each HF tensor, the full shapes fit the config
  (converters/hf_checks), and the pieces are exactly what the plan in the manifest implies;
- against SRC: every AFD tensor equals its source slice bit for bit, and no source tensor is left out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.afd import AFDLayout
from converters.errors import CheckpointError
from converters.hf import HFCheckpoint
from converters.hf_checks import expected_specs, is_vision_name, name_problems, tensor_problems
from converters.layout import CONFIG, MANIFEST, SourceTensor, plan_pieces
from converters.slices import header_of, read_array
from converters.writer import ProgressFn, sha256_file


@dataclass
class VerifyReport:
    path: Path
    against: Path | None
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _file_problems(layout: AFDLayout, tick: Callable[[int, str], None]) -> list[str]:
    problems = []
    for rel, rec in layout.files.items():
        path = layout.path / rel
        if not path.is_file():
            problems.append(f"{rel}: missing (the manifest lists it)")
            continue
        size = path.stat().st_size
        if size != rec.get("bytes"):
            problems.append(f"{rel}: {size} bytes, the manifest says {rec.get('bytes')} (truncated?)")
        elif sha256_file(path) != rec.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest (the file is corrupt or was edited)")
        tick(size, rel)
    listed = set(layout.files)
    for path in sorted(layout.path.rglob("*.safetensors")):
        rel = path.relative_to(layout.path).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: a tensor file the manifest does not list")
    return problems


def _header_problems(layout: AFDLayout) -> list[str]:
    problems = []
    config = layout.path / CONFIG
    try:
        if json.loads(config.read_text()) != layout.manifest["config"]:
            problems.append(f"{CONFIG}: differs from the manifest's config")
    except (OSError, ValueError) as e:
        problems.append(f"{CONFIG}: unreadable ({e})")
    for key, p in layout.pieces.items():
        if p.file not in layout.files:
            problems.append(f"{key}: its file {p.file} is not in the manifest's files")
            continue
        try:
            entry = header_of(layout.path / p.file).entries.get(p.source)
        except CheckpointError as e:
            problems.append(f"{key}: {e}")
            continue
        if entry is None:
            problems.append(f"{key}: {p.file} holds no tensor {p.source}")
        elif (entry.dtype, entry.shape) != (p.dtype, p.shape):
            problems.append(f"{key}: manifest says {p.dtype} {list(p.shape)}, {p.file} holds "
                            f"{entry.dtype} {list(entry.shape)}")
    return problems


def _plan_problems(layout: AFDLayout) -> list[str]:
    """The pieces must tile each HF tensor, fit the config, and be exactly what the plan implies."""
    view = layout.hf_view()
    problems: list[str] = []
    infos = {}
    for name in view.names():
        try:
            infos[name] = view.info(name)
        except CheckpointError as e:
            problems.append(f"{name}: {e}")
    if problems:
        return problems
    has_vision = any(is_vision_name(n) for n in infos)
    specs, problems = expected_specs(layout.config, set(infos), has_vision)
    weight_map = {n: MANIFEST for n in infos}
    problems += name_problems(specs, weight_map) + tensor_problems(specs, infos, weight_map)
    if problems:
        return problems
    sources = [SourceTensor(n, i.dtype, i.shape) for n, i in infos.items()]
    try:
        want = {p.key: p for _, p in plan_pieces(layout.config, sources, layout.ffn_ranks, has_vision)}
    except CheckpointError as e:
        return [str(e)]
    have = layout.pieces
    problems += [f"{k}: missing from the manifest's tensors" for k in want if k not in have]
    problems += [f"{k}: not part of the plan" for k in have if k not in want]
    for k in set(want) & set(have):
        w, h = want[k], have[k]
        if (w.source, w.dtype, w.shape, w.slice) != (h.source, h.dtype, h.shape, h.slice):
            problems.append(f"{k}: manifest entry differs from the plan (source/dtype/shape/slice)")
    return problems


def _source_problems(layout: AFDLayout, src: Path, tick: Callable[[int, str], None]) -> list[str]:
    problems = []
    with HFCheckpoint(src) as ckpt:
        sources = set(layout.hf_view().names())
        problems += [f"{n}: in {src} but not in the layout" for n in ckpt.names() if n not in sources]
        for key, p in layout.pieces.items():
            if p.source not in ckpt.weight_map:
                problems.append(f"{key}: its source {p.source} is not in {src}")
                continue
            try:
                info = ckpt.info(p.source)
                mine = read_array(layout.path / p.file, p.source)
                theirs = read_array(ckpt.path / info.file, p.source, p.slice)
            except CheckpointError as e:
                problems.append(f"{key}: {e}")
                continue
            if p.dtype != info.dtype or not np.array_equal(mine, theirs):  # bits, shapes included
                problems.append(f"{key}: differs from {p.source}{[list(s) for s in p.slice] or ''} in {src}")
            tick(p.nbytes, key)
    return problems


def verify_layout(path: str | Path, against: str | Path | None = None,
                  progress: ProgressFn | None = None) -> VerifyReport:
    """Check an AFD layout; problems are returned (not raised) so that all of them are reported."""
    layout = AFDLayout(path)  # a missing or unreadable manifest is a CheckpointError
    report = VerifyReport(layout.path, Path(against) if against else None)
    total = sum(int(r.get("bytes", 0)) for r in layout.files.values())
    if against:
        total += sum(p.nbytes for p in layout.pieces.values())
    done = 0

    def tick(n: int, label: str) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total, label)

    report.problems += _file_problems(layout, tick)
    report.problems += _header_problems(layout)
    report.problems += _plan_problems(layout)
    if against:
        report.problems += _source_problems(layout, Path(against), tick)
    report.files, report.tensors, report.bytes = len(layout.files), len(layout.pieces), done
    return report
