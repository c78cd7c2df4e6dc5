"""converters.synth: synthetic checkpoints match the tensor table, are reproducible, and load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converters.config import PRESETS, TINY_VISION, Step3Config
from converters.errors import CheckpointError, ConfigError
from converters.names import scale_name, scale_shape, tensor_specs
from converters.synth import INDEX_NAME, plan_shards, synthesize
from quant.fp8 import FP8_DTYPE, dequantize_fp8

TINY = PRESETS["step3-tiny"]


def read_all(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in index order, read through the index."""
    index = json.loads((ckpt / INDEX_NAME).read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(ckpt / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def shard_keys(ckpt: Path) -> list[str]:
    """Tensor names in file order, shard by shard (the order synthesize promises: the spec order)."""
    keys = []
    for file in sorted(ckpt.glob("model-*-of-*.safetensors")):
        with safe_open(file, "pt") as f:
            keys += list(f.keys())
    return keys


def expected_entries(cfg: Step3Config, fp8: bool, vision: bool) -> dict[str, tuple]:
    """name -> (shape, dtype) as the checkpoint must store it, in table order."""
    out = {}
    for spec in tensor_specs(cfg, vision):
        if fp8 and spec.quantize:
            out[spec.name] = (spec.shape, FP8_DTYPE)
            out[scale_name(spec.name)] = (scale_shape(spec.shape), torch.float32)
        else:
            out[spec.name] = (spec.shape, torch.bfloat16)
    return out


@pytest.mark.parametrize("which,fp8,vision", [("tiny_ckpt", False, False), ("tiny_fp8_ckpt", True, False),
                                              ("tiny_vision_ckpt", False, True)])
def test_names_shapes_dtypes_match_table(request, which, fp8, vision):
    ckpt = request.getfixturevalue(which)
    cfg = Step3Config.from_pretrained(ckpt)
    assert (cfg.vision is not None) == vision
    expected = expected_entries(cfg, fp8, vision)
    tensors = read_all(ckpt)
    assert list(tensors) == list(expected)  # index order is the table order
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == expected
    assert sorted(shard_keys(ckpt)) == sorted(expected)


@pytest.mark.parametrize("which,shards", [("tiny_ckpt", 1), ("tiny_fp8_ckpt", 2)])
def test_index_covers_every_tensor_and_total_size(request, which, shards):
    ckpt = request.getfixturevalue(which)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == files
    assert not list(ckpt.glob("*.tmp"))
    for file in files:
        with safe_open(ckpt / file, "pt") as f:
            assert set(f.keys()) == {n for n, fl in index["weight_map"].items() if fl == file}
    data = sum(t.numel() * t.element_size() for t in read_all(ckpt).values())
    assert index["metadata"]["total_size"] == data


def test_shards_have_about_equal_bytes(tiny_fp8_ckpt):
    sizes = [p.stat().st_size for p in sorted(tiny_fp8_ckpt.glob("*.safetensors"))]
    assert len(sizes) == 2 and max(sizes) < 1.5 * min(sizes), sizes


def test_plan_shards_keeps_order_and_rejects_bad_counts():
    specs = tensor_specs(TINY)
    for n in (1, 2, 5, len(specs)):
        plan = plan_shards(specs, fp8=False, shards=n)
        assert len(plan) == n and all(plan)
        assert [s for group in plan for s in group] == specs
    for bad in (0, len(specs) + 1):
        with pytest.raises(ConfigError, match="shards"):
            plan_shards(specs, fp8=False, shards=bad)


def test_config_round_trips_and_fp8_quantization_config(tiny_ckpt, tiny_fp8_ckpt, tiny_vision_ckpt):
    cfg = Step3Config.from_pretrained(tiny_ckpt)
    assert cfg == TINY.replace(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                               image_token_id=cfg.image_token_id)
    assert "quantization_config" not in json.loads((tiny_ckpt / "config.json").read_text())
    qc = json.loads((tiny_fp8_ckpt / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": [128, 128]}
    assert Step3Config.from_pretrained(tiny_vision_ckpt).vision == TINY_VISION


def test_same_seed_same_bytes_across_shard_counts(tiny_ckpt, make_ckpt):
    again = make_ckpt(shards=4)
    ref, other = read_all(tiny_ckpt), read_all(again)
    assert list(ref) == list(other)
    for name in ref:
        assert torch.equal(ref[name], other[name]), name
    one_more = make_ckpt()
    assert (one_more / "model-00001-of-00001.safetensors").read_bytes() == \
        (tiny_ckpt / "model-00001-of-00001.safetensors").read_bytes()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 INDEX_NAME):
        assert (one_more / file).read_bytes() == (tiny_ckpt / file).read_bytes(), file


def test_different_seed_differs(tiny_ckpt, make_ckpt):
    ref, other = read_all(tiny_ckpt), read_all(make_ckpt(seed=1))
    for name in ref:
        assert not torch.equal(ref[name], other[name]), name


def test_fp8_dequantizes_to_the_bf16_twin(tiny_ckpt, tiny_fp8_ckpt):
    bf16, fp8 = read_all(tiny_ckpt), read_all(tiny_fp8_ckpt)
    quantized = [s for s in tensor_specs(TINY) if s.quantize]
    assert quantized
    for spec in tensor_specs(TINY):
        w = bf16[spec.name].float()
        if not spec.quantize:
            assert torch.equal(fp8[spec.name], bf16[spec.name]), spec.name
            continue
        q, s = fp8[spec.name], fp8[scale_name(spec.name)]
        assert s.shape == scale_shape(spec.shape) and bool((s > 0).all())
        deq = dequantize_fp8(q, s)
        # E4M3 has 3 mantissa bits: relative error <= 2^-4 for normal values, plus subnormal slack.
        err = (deq - w).abs()
        assert bool((err <= w.abs() * 2**-4 + s.amax() * 2**-9).all()), spec.name
        rel = (deq - w).norm() / w.norm()
        assert 0 < rel < 0.05, (spec.name, float(rel))


def test_refuses_non_empty_output_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not empty"):
        synthesize(out, TINY)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    synthesize(out, TINY, shards=3, overwrite=True)
    synthesize(out, TINY, shards=2, overwrite=True)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "keep.txt").read_text() == "user data"
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        synthesize(file, TINY)


def test_progress_reports_bytes_up_to_total(tmp_path):
    calls = []
    synthesize(tmp_path / "c", TINY, fp8=True,
               progress=lambda done, total, label="": calls.append((done, total, label)))
    total = json.loads((tmp_path / "c" / INDEX_NAME).read_text())["metadata"]["total_size"]
    assert calls[-1][:2] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:], strict=False))
    labels = {label for _, _, label in calls}
    assert labels >= {"lm_head.weight", scale_name("model.layers.0.mlp.up_proj.weight")}
