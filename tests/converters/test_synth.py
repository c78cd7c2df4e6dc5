"""converters.synth: synthetic checkpoints match the tensor table, are reproducible, and load."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2.sandbox
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from converters.config import PRESETS, TINY_VISION, Step3Config
from converters.errors import ConfigError, Step3Error
from converters.hf import INDEX_FILE, HFCheckpoint
from converters.names import scale_name, scale_shape, tensor_specs, vision_tensor_specs
from converters.synth import LOGIT_STD, plan_shards, synthesize, synthetic_vision_config
from converters.tokenizer_synth import BOS, BOT, EOS, EOT, EXTRA_SPECIALS, IM_PATCH, THINK, build_tokenizer
from quant.fp8 import FP8_DTYPE, dequantize_fp8
from runtime.model.reference import Step3Reference

TINY = PRESETS["step3-tiny"]


def read_all(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in index order, read through the index."""
    index = json.loads((ckpt / INDEX_FILE).read_text())
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
    index = json.loads((ckpt / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == files
    assert not list(ckpt.glob("*.partial"))
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
                 INDEX_FILE):
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
    with pytest.raises(Step3Error, match="not empty"):
        synthesize(out, TINY)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    synthesize(out, TINY, shards=3, overwrite=True)
    synthesize(out, TINY, shards=2, overwrite=True)  # the 3 old shards were ours: they go
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (out / "keep.txt").read_text() == "user data"  # not ours: kept
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(Step3Error, match="not a directory"):
        synthesize(file, TINY)


def test_progress_reports_file_bytes_up_to_total(tmp_path):
    calls = []
    synthesize(tmp_path / "c", TINY, shards=2,
               progress=lambda done, total, label="": calls.append((done, total, label)))
    total = sum(p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors"))
    assert calls[-1][:2] == (total, total)
    assert all(a[0] <= b[0] and a[1] == total for a, b in zip(calls, calls[1:], strict=False))
    labels = {label for _, _, label in calls}
    assert labels >= {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


# ---- tokenizer, chat template, generation config ---------------------------------------------------
ROUND_TRIP_TEXTS = ["", "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n",
                    "naïve café — 日本語のテキスト, emoji 🙂🚀, Ελληνικά", "\x00\x01 control bytes \x7f",
                    "a<think>b</think>c<|BOT|>x<|EOT|>"]


def test_tokenizer_round_trips_any_text_and_fits_the_vocab(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cfg = Step3Config.from_pretrained(tiny_ckpt)
    assert tok.get_vocab_size() <= cfg.vocab_size
    rng = random.Random(0)
    random_text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFF)]))
                          for _ in range(300))
    for text in [*ROUND_TRIP_TEXTS, random_text]:
        ids = tok.encode(text).ids
        assert all(0 <= i < cfg.vocab_size for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text, text


def test_special_tokens_are_atomic_with_the_config_ids(tiny_ckpt):
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    cfg = Step3Config.from_pretrained(tiny_ckpt)
    tc = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert tok.token_to_id(tc["bos_token"]) == cfg.bos_token_id == gen["bos_token_id"]
    assert tok.token_to_id(tc["eos_token"]) == cfg.eos_token_id == gen["eos_token_id"][0]
    assert tok.token_to_id(IM_PATCH) == cfg.image_token_id == TINY.image_token_id  # fits: kept at 511
    assert gen["eos_token_id"][1] == tok.token_to_id(EOT)
    specials = [BOS, EOS, *EXTRA_SPECIALS]
    ids = {t: tok.token_to_id(t) for t in specials}
    assert len(set(ids.values())) == len(specials) and None not in ids.values()
    for t in specials:
        assert tok.encode(f"x {t}y").ids[-2] == ids[t]  # one id, even glued to text
        assert tok.encode(t).ids == [ids[t]]
        assert tc["added_tokens_decoder"][str(ids[t])]["content"] == t
    assert tok.decode(tok.encode(f"a{THINK}b").ids, skip_special_tokens=True) == "ab"


def test_small_vocab_is_filled_and_image_token_kept():
    st = build_tokenizer(PRESETS["step3-small"])
    assert st.tokenizer.get_vocab_size() == PRESETS["step3-small"].vocab_size
    assert st.image_token_id == PRESETS["step3-small"].image_token_id
    with pytest.raises(ConfigError, match="vocab_size"):
        build_tokenizer(TINY.replace(vocab_size=200))


def test_image_token_moves_when_the_config_id_cannot_be_honoured(make_ckpt):
    ckpt = make_ckpt(cfg=TINY.replace(image_token_id=5))  # inside the byte range: not possible
    cfg = Step3Config.from_pretrained(ckpt)
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert cfg.image_token_id != 5 and tok.token_to_id(IM_PATCH) == cfg.image_token_id < cfg.vocab_size


@pytest.mark.parametrize("env", [jinja2.sandbox.ImmutableSandboxedEnvironment(),
                                 jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                                               lstrip_blocks=True)])
def test_chat_template_renders_step3_format(tiny_ckpt, env):
    tc = json.loads((tiny_ckpt / "tokenizer_config.json").read_text())
    template = env.from_string(tc["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<think>greet back</think>\n\nHello!"},
                {"role": "user", "content": [{"type": "text", "text": "What is this? "},
                                             {"type": "image_url", "image_url": {"url": "x.png"}}]}]
    text = template.render(messages=messages, bos_token=tc["bos_token"], add_generation_prompt=True)
    assert text == (f"{BOS}Be brief.{BOT}user\nHi{EOT}{BOT}assistant\nHello!{EOT}"
                    f"{BOT}user\nWhat is this? {IM_PATCH}{EOT}{BOT}assistant\n{THINK}\n")
    no_prompt = template.render(messages=messages[1:2], bos_token=tc["bos_token"],
                                add_generation_prompt=False)
    assert no_prompt == f"{BOS}{BOT}user\nHi{EOT}"
    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id(BOS) and ids[-2:] == [tok.token_to_id(THINK), tok.encode("\n").ids[0]]


def test_tokenizer_is_deterministic_across_processes(tiny_ckpt, tmp_path):
    """The BPE trainer runs in Rust with per-process hash seeds: a fresh process must train the same."""
    code = ("import sys; from converters.config import PRESETS; from converters.tokenizer_synth import "
            "build_tokenizer; tok = build_tokenizer(PRESETS['step3-tiny']).tokenizer; "
            "sys.stdout.buffer.write(tok.to_str(pretty=True).encode())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert fresh == (tiny_ckpt / "tokenizer.json").read_bytes()


# ---- the checkpoint loads: validator and reference model -------------------------------------------
@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_fp8_ckpt", "tiny_vision_ckpt"])
def test_validates_with_hf_checkpoint(request, which):
    ckpt = request.getfixturevalue(which)
    with HFCheckpoint(ckpt) as hf:
        hf.validate()
        assert hf.is_fp8 == (which == "tiny_fp8_ckpt")
        assert hf.has_vision == (which == "tiny_vision_ckpt")


def test_small_vision_tower_is_scaled_to_the_model():
    assert synthetic_vision_config(TINY) == TINY_VISION
    small = synthetic_vision_config(PRESETS["step3-small"])
    assert TINY_VISION.hidden_size < small.hidden_size < PRESETS["step3"].vision.hidden_size
    assert sum(s.numel for s in vision_tensor_specs(small, 1024)) < 20e6


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_fp8_ckpt"])
def test_reference_logits_are_neither_flat_nor_exploding(request, which):
    """Random weights that still give a usable model: logits std ~LOGIT_STD, argmax varies with context."""
    model = Step3Reference.from_pretrained(request.getfixturevalue(which))
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = model(ids)  # [2, 24, V]
    std = logits.std(dim=-1)
    assert torch.isfinite(logits).all()
    assert bool((std > LOGIT_STD / 2).all() and (std < LOGIT_STD * 2).all()), std
    assert logits.argmax(-1).unique().numel() > ids.numel() // 2
    same_token = ids.clone()
    same_token[:, -1] = ids[0, -1]  # the same last token after two different prefixes
    last = model(same_token)[:, -1]
    assert not torch.allclose(last[0], last[1], atol=0.1)  # the layers carry context, not just the token


def test_resume_finishes_an_interrupted_run_with_the_same_bytes(tiny_fp8_ckpt, tmp_path):
    out = shutil.copytree(tiny_fp8_ckpt, tmp_path / "ckpt")
    (out / "config.json").unlink()  # as if killed while writing the second shard
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(Step3Error, match="other inputs or options"):
        synthesize(out, TINY, fp8=True, shards=2, seed=1, resume=True)
    synthesize(out, TINY, fp8=True, shards=2, resume=True)
    for file in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (out / file).read_bytes() == (tiny_fp8_ckpt / file).read_bytes(), file
