"""HF -> AFD -> HF: round trips, the split semantics, refusals, crash + resume, and the reference model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters import convert as convert_mod
from converters import writer
from converters.config import Step3Config
from converters.convert import afd_to_hf, hf_to_afd
from converters.errors import CheckpointError, Step3Error
from converters.hf import HFCheckpoint
from converters.layout import MANIFEST
from converters.verify import verify_layout
from runtime.model.reference import Step3Reference, mlp


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (the resume journal aside) -> its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != writer.JOURNAL}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory of safetensors files, read with the safetensors library itself."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


CASES = [("tiny_ckpt", 1), ("tiny_ckpt", 2), ("tiny_ckpt", 4), ("tiny_fp8_ckpt", 1), ("tiny_fp8_ckpt", 2),
         ("tiny_vision_ckpt", 2), ("tiny_vision_ckpt", 4)]


@pytest.mark.parametrize(("fixture", "ffn_ranks"), CASES)
def test_round_trip_gives_the_same_checkpoint(fixture, ffn_ranks, request, tmp_path):
    src: Path = request.getfixturevalue(fixture)
    afd, back = tmp_path / "afd", tmp_path / "hf"
    hf_to_afd(src, afd, ffn_ranks=ffn_ranks, shard_size=300_000)
    assert verify_layout(afd, against=src).problems == []
    afd_to_hf(afd, back, shard_size=1_000_000)
    a, b = HFCheckpoint(src), HFCheckpoint(back)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(_raw(x), _raw(y)), name
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (src / f).read_bytes() == (back / f).read_bytes() == (afd / f).read_bytes(), f
    b.validate()
    manifest = json.loads((afd / MANIFEST).read_text())
    assert manifest["quantization"] == (json.loads((src / "config.json").read_text())["quantization_config"]
                                        if a.is_fp8 else None)
    assert (afd / "vision").is_dir() == a.has_vision
    assert Step3Config.from_pretrained(afd) == a.config


@pytest.mark.parametrize(("fixture", "ffn_ranks"), [("tiny_ckpt", 4), ("tiny_fp8_ckpt", 2)])
def test_ranks_hold_expert_ranges_and_tp_slices_that_sum_to_the_ffn(fixture, ffn_ranks, request, tmp_path):
    """Read back with the safetensors library: rank K holds experts [K E/F, (K+1) E/F) and 1/F of each MLP,
    and the F partial dense-MLP / shared-expert outputs sum to the full output."""
    src: Path = request.getfixturevalue(fixture)
    hf_to_afd(src, tmp_path / "afd", ffn_ranks=ffn_ranks)
    ckpt = HFCheckpoint(src)
    cfg, E = ckpt.config, ckpt.config.moe_num_experts
    ranks = [_load_dir(tmp_path / "afd" / "ffn" / f"rank-{k}") for k in range(ffn_ranks)]
    attention = _load_dir(tmp_path / "afd" / "attention")
    assert not any(".mlp." in n or ".share_expert." in n or "moe.gate_proj" in n for n in attention)
    moe = f"model.layers.{cfg.moe_layers[0]}"
    full = ckpt.get(f"{moe}.moe.up_proj.weight")
    for k, rank in enumerate(ranks):
        lo, hi = k * E // ffn_ranks, (k + 1) * E // ffn_ranks
        assert torch.equal(_raw(rank[f"{moe}.moe.up_proj.weight"]), _raw(full[lo:hi].contiguous()))
        if ckpt.is_fp8:
            scale = ckpt.get(f"{moe}.moe.up_proj.weight_scale_inv")
            assert torch.equal(rank[f"{moe}.moe.up_proj.weight_scale_inv"], scale[lo:hi])
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    for prefix in (f"model.layers.{cfg.dense_layers[0]}.mlp", f"{moe}.share_expert"):
        names = [f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down")]
        want = mlp(x, *(ckpt.get_weight(n, torch.float32) for n in names))
        got = sum(mlp(x, *(_dequant(rank, n) for n in names)) for rank in ranks)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _dequant(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    from quant.fp8 import dequantize_fp8

    w = tensors[name]
    return dequantize_fp8(w, tensors[name + "_scale_inv"]) if w.dtype == torch.float8_e4m3fn else w.float()


def test_reference_logits_from_the_layout_equal_those_from_the_source(tiny_fp8_ckpt, tmp_path):
    hf_to_afd(tiny_fp8_ckpt, tmp_path / "afd", ffn_ranks=2)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    want = Step3Reference.from_pretrained(tiny_fp8_ckpt)(ids)
    got = Step3Reference.from_pretrained(tmp_path / "afd")(ids)
    assert want.std() > 0.1 and torch.equal(got, want)


def test_fp8_split_off_a_128_boundary_is_a_clear_error(tiny_fp8_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"--ffn-ranks 4.*128") as e:
        hf_to_afd(tiny_fp8_ckpt, tmp_path / "afd", ffn_ranks=4)
    assert any("share_expert.down_proj.weight" in p and "dim 1" in p for p in e.value.problems)
    assert not (tmp_path / "afd").exists()


def test_ffn_ranks_must_divide_experts_and_intermediate_dims(tiny_ckpt, tmp_path):
    with pytest.raises(Step3Error, match=r"--ffn-ranks 3 does not divide moe_num_experts=8.*choose one of"):
        hf_to_afd(tiny_ckpt, tmp_path / "afd", ffn_ranks=3)
    with pytest.raises(Step3Error, match="--attn-ranks"):
        hf_to_afd(tiny_ckpt, tmp_path / "afd", ffn_ranks=2, attn_ranks=0)
    with pytest.raises(Step3Error, match="output directory is the input directory"):
        hf_to_afd(tiny_ckpt, tiny_ckpt, ffn_ranks=2, force=True)


def test_invalid_source_is_refused_with_every_problem_before_writing(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 384  # every tensor that uses it is now the wrong shape
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        hf_to_afd(src, tmp_path / "afd", ffn_ranks=2)
    assert len(e.value.problems) > 10 and "model.embed_tokens.weight" in str(e.value)
    assert not (tmp_path / "afd").exists()


def test_crash_mid_file_then_resume_is_byte_identical(tiny_fp8_ckpt, tmp_path, monkeypatch):
    hf_to_afd(tiny_fp8_ckpt, tmp_path / "ref", ffn_ranks=2, shard_size=200_000)
    real, calls = convert_mod.read_piece, {"n": 0}

    def dies_on_the_40th_read(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 40:  # somewhere inside a multi-tensor file
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(convert_mod, "read_piece", dies_on_the_40th_read)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=2, shard_size=200_000)
    partial = list(out.rglob("*" + writer.PARTIAL))
    assert len(partial) == 1 and not (out / MANIFEST).exists() and not (out / "config.json").exists()
    with pytest.raises(Step3Error, match="not empty"):
        hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=2, shard_size=200_000)
    monkeypatch.setattr(convert_mod, "read_piece", real)
    res = hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=2, shard_size=200_000, resume=True)
    assert res.write.skipped and res.write.written
    assert tree(out) == tree(tmp_path / "ref")
    with pytest.raises(Step3Error, match="other inputs or options"):
        hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=1, shard_size=200_000, resume=True)


def test_out_of_space_before_and_during_the_run(tiny_ckpt, tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1_000_000})())
    with pytest.raises(Step3Error, match=r"need 14\.\d\d MB, 1\.00 MB free"):
        hf_to_afd(tiny_ckpt, tmp_path / "a", ffn_ranks=2)
    monkeypatch.undo()
    real, calls = writer._write_safetensors, {"n": 0}

    def disk_fills_up(f, spec, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"x" * 100)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, spec, *args)

    monkeypatch.setattr(writer, "_write_safetensors", disk_fills_up)
    with pytest.raises(Step3Error, match="out of disk space while writing .*--resume"):
        hf_to_afd(tiny_ckpt, tmp_path / "b", ffn_ranks=2, shard_size=500_000)
    assert not list((tmp_path / "b").rglob("*" + writer.PARTIAL))
    monkeypatch.undo()
    hf_to_afd(tiny_ckpt, tmp_path / "b", ffn_ranks=2, shard_size=500_000, resume=True)
    hf_to_afd(tiny_ckpt, tmp_path / "c", ffn_ranks=2, shard_size=500_000)
    assert tree(tmp_path / "b") == tree(tmp_path / "c")
