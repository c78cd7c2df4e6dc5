"""converters/verify.py: every kind of damage is reported by name; an intact layout has no problems."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.convert import hf_to_afd
from converters.errors import CheckpointError
from converters.layout import MANIFEST
from converters.verify import verify_layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_fp8_ckpt) -> Path:
    """A read-only FP8 layout over 2 FFN ranks; tests damage copies of it."""
    out = tmp_path_factory.mktemp("verify") / "afd"
    hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=2, shard_size=500_000)
    return out


@pytest.fixture
def copy(layout, tmp_path) -> Path:
    shutil.copytree(layout, tmp_path / "afd")
    return tmp_path / "afd"


def _edit_manifest(root: Path, change) -> None:
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=2))


def test_intact_layout_passes_with_and_without_source(layout, tiny_fp8_ckpt):
    seen = []
    report = verify_layout(layout, against=tiny_fp8_ckpt, progress=lambda d, t, label="": seen.append((d, t)))
    assert report.ok, report.problems
    assert report.tensors == len(json.loads((layout / MANIFEST).read_text())["tensors"])
    assert seen and seen[-1][0] == seen[-1][1] == report.bytes
    assert verify_layout(layout).ok


def test_flipped_byte_is_named_and_against_names_the_tensor(copy, tiny_fp8_ckpt):
    m = json.loads((copy / MANIFEST).read_text())
    key = "ffn/rank-1:model.layers.2.moe.down_proj.weight"
    entry = m["tensors"][key]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last byte belongs to the file's last tensor
    path.write_bytes(bytes(data))
    last = list(k for k, v in m["tensors"].items() if v["file"] == entry["file"])[-1]
    problems = verify_layout(copy, against=tiny_fp8_ckpt).problems
    assert any(entry["file"] in p and "sha256" in p for p in problems)
    assert any(p.startswith(last + ": differs from") for p in problems)
    assert len(problems) == 2, problems


def test_truncated_and_missing_files_are_named(copy):
    files = sorted((copy / "attention").glob("*.safetensors"))
    with open(files[0], "r+b") as f:
        f.truncate(files[0].stat().st_size - 3)
    files[1].unlink()
    problems = verify_layout(copy).problems
    rel0, rel1 = (f.relative_to(copy).as_posix() for f in files[:2])
    assert any(p.startswith(rel0) and "bytes" in p for p in problems)
    assert any(p.startswith(rel1) and "missing" in p for p in problems)


@pytest.mark.parametrize(("change", "expect"), [
    (lambda m: m["tensors"]["ffn/rank-0:model.layers.0.mlp.gate_proj.weight"].update(slice=[[0, 0, 128]]),
     "model.layers.0.mlp.gate_proj.weight"),
    (lambda m: m["tensors"]["model.norm.weight"].update(shape=[10]), "model.norm.weight"),
    (lambda m: m["tensors"].pop("ffn/rank-1:model.layers.3.moe.up_proj.weight"),
     "model.layers.3.moe.up_proj.weight: shape [4, 192, 320]"),
    (lambda m: m["files"][next(iter(m["files"]))].update(sha256="0" * 64), "sha256"),
    (lambda m: m["config"]["text_config"].update(hidden_size=384), "config.json"),
    (lambda m: m["plan"]["ffn"].update(ranks=1), "ffn/rank-1:model.layers.0.mlp.up_proj.weight: not part of"),
])
def test_edited_manifest_is_reported_by_name(copy, change, expect):
    _edit_manifest(copy, change)
    problems = verify_layout(copy).problems
    assert problems and any(expect in p for p in problems), problems


def test_unlisted_tensor_file_and_missing_manifest(copy):
    extra = copy / "ffn" / "rank-0" / "extra.safetensors"
    shutil.copy(next((copy / "attention").glob("*.safetensors")), extra)
    problems = verify_layout(copy).problems
    assert any("ffn/rank-0/extra.safetensors" in p and "does not list" in p for p in problems)
    (copy / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        verify_layout(copy)


def test_against_another_checkpoint_reports_differing_tensors(layout, make_ckpt):
    other = make_ckpt(fp8=True, seed=5)
    problems = verify_layout(layout, against=other).problems
    assert any(p.startswith("ffn/rank-0:model.layers.0.mlp.up_proj.weight: differs") for p in problems)
    assert any(p.startswith("model.embed_tokens.weight: differs") for p in problems)
