"""converters.hf.HFCheckpoint: lazy reads, header-only facts, FP8 dequantization, every validate() problem.

Corruptions work on copies of the session checkpoints (tests/conftest.py); tensors are re-read with
safetensors' own `load_file` as the independent reference.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import converters.safetensors_io as safetensors_io
from converters.config import PRESETS
from converters.errors import CheckpointError, ConfigError, Step3Error
from converters.hf import INDEX_FILE, MAX_OPEN_SHARDS, HFCheckpoint
from converters.names import scale_name, scale_shape, spec_table, tensor_specs
from quant.fp8 import FP8_DTYPE, quantize_fp8

Tensors = dict[str, torch.Tensor]


# ---- helpers -----------------------------------------------------------------------------------------
def copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ckpt"))


def weight_map(ckpt: Path) -> dict[str, str]:
    return json.loads((ckpt / INDEX_FILE).read_text())["weight_map"]


def load_all(ckpt: Path) -> Tensors:
    """Every tensor, read by safetensors itself (not by the code under test)."""
    out: Tensors = {}
    for file in dict.fromkeys(weight_map(ckpt).values()):
        out.update(load_file(ckpt / file))
    return out


def rewrite(ckpt: Path, edit: Callable[[Tensors], None]) -> None:
    """Load every tensor, let `edit` change the dict, write it back as one shard with a matching index."""
    tensors = load_all(ckpt)
    edit(tensors)
    for file in set(weight_map(ckpt).values()):
        (ckpt / file).unlink()
    shard = "model-00001-of-00001.safetensors"
    save_file({n: t.contiguous() for n, t in tensors.items()}, ckpt / shard)
    write_index(ckpt, dict.fromkeys(tensors, shard))


def write_index(ckpt: Path, wmap: dict[str, str]) -> None:
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def problems(ckpt: Path) -> list[str]:
    with HFCheckpoint(ckpt) as c, pytest.raises(CheckpointError) as e:
        c.validate()
    assert e.value.problems and all(p in str(e.value) for p in e.value.problems)
    return e.value.problems


def only_problem(ckpt: Path, *words: str) -> str:
    """validate() finds exactly one problem, and it contains every word."""
    found = problems(ckpt)
    assert len(found) == 1, found
    for w in words:
        assert w in found[0], (w, found[0])
    return found[0]


# ---- reading valid checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_fp8_ckpt", "tiny_vision_ckpt"])
def test_valid_checkpoints(which, request):
    path = request.getfixturevalue(which)
    reference = load_all(path)
    with HFCheckpoint(path) as c:
        c.validate()
        assert c.names() == list(weight_map(path))
        assert set(c.names()) == set(reference)
        assert c.is_fp8 is (which == "tiny_fp8_ckpt") and c.has_vision is (which == "tiny_vision_ckpt")
        assert c.shard_files() == [path / f for f in dict.fromkeys(weight_map(path).values())]
        assert c.total_bytes() == sum(t.numel() * t.element_size() for t in reference.values())
        for name, ref in reference.items():
            info = c.info(name)
            assert info.shape == tuple(ref.shape) and info.nbytes == ref.numel() * ref.element_size()
            got = c.get(name)
            assert got.dtype == ref.dtype and torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), name


def test_expected_names_come_from_the_table(tiny_ckpt, tiny_fp8_ckpt):
    with HFCheckpoint(tiny_ckpt) as c:
        assert set(c.names()) == set(spec_table(c.config))
        assert {n: c.info(n).shape for n in c.names()} == {s.name: s.shape for s in tensor_specs(c.config)}
        assert {c.info(n).dtype for n in c.names()} == {"BF16"}
    with HFCheckpoint(tiny_fp8_ckpt) as c:
        quantized = {s.name for s in tensor_specs(c.config) if s.quantize}
        assert {n for n in c.names() if c.info(n).dtype == "F8_E4M3"} == quantized
        assert {n for n in c.names() if n.endswith("_scale_inv")} == {scale_name(n) for n in quantized}


def test_fp8_get_weight_matches_the_bf16_twin(tiny_ckpt, tiny_fp8_ckpt):
    """Same seed, so the FP8 checkpoint quantizes exactly the BF16 weights: E4M3 error bounds must hold."""
    with HFCheckpoint(tiny_ckpt) as bf16, HFCheckpoint(tiny_fp8_ckpt) as fp8:
        checked = 0
        # layer 1 (dense) and 2 (MoE) cover every kind of quantized weight; dequantizing all is slow on CPU
        for name in [n for n in bf16.names() if not n.startswith(("model.layers.0.", "model.layers.3.",
                                                                  "model.layers.4.", "model.layers.5."))]:
            w = bf16.get_weight(name)
            got = fp8.get_weight(name, dtype=torch.float32)
            assert got.dtype == torch.float32 and got.shape == w.shape
            if fp8.info(name).dtype != "F8_E4M3":
                assert torch.equal(got, w), name
                continue
            s = fp8.get(scale_name(name)).repeat_interleave(128, -2).repeat_interleave(128, -1)
            s = s[..., : w.shape[-2], : w.shape[-1]]
            # 3 mantissa bits: half an ulp is 2^-4 relative; E4M3 subnormals are spaced 2^-9 (x scale_inv)
            assert ((got - w).abs() <= w.abs() * 2**-4 + s * 2**-10 + 1e-12).all(), name
            assert not torch.equal(got, w)
            checked += 1
        assert checked > 0
        assert fp8.get_weight(bf16.names()[1], dtype=torch.bfloat16).dtype == torch.bfloat16


def test_single_file_checkpoint(tiny_ckpt, tmp_path):
    reference = load_all(tiny_ckpt)
    save_file(reference, tmp_path / "model.safetensors")
    shutil.copy(tiny_ckpt / "config.json", tmp_path)
    with HFCheckpoint(tmp_path) as c:
        c.validate()
        assert set(c.names()) == set(reference) and c.shard_files() == [tmp_path / "model.safetensors"]
        name = "model.layers.2.moe.gate_proj.weight"
        assert torch.equal(c.get(name), reference[name])


def test_file_handles_stay_bounded(make_ckpt):
    path = make_ckpt(shards=MAX_OPEN_SHARDS + 3)
    with HFCheckpoint(path) as c:
        assert len(c.shard_files()) == MAX_OPEN_SHARDS + 3
        for name in c.names():
            c.get(name)
            assert len(c._handles) <= MAX_OPEN_SHARDS
    assert not c._handles


# ---- header-only -------------------------------------------------------------------------------------
def test_facts_read_headers_only(tiny_fp8_ckpt, monkeypatch):
    """info/validate/total_bytes read 8 + header bytes per shard and never open safetensors' loader."""
    read = []

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

    real_open = open
    counting = lambda p, mode: CountingFile(real_open(p, mode))  # noqa: E731
    monkeypatch.setattr(safetensors_io, "open", counting, raising=False)
    monkeypatch.setattr("converters.hf.safe_open", None)  # any data access would fail
    with HFCheckpoint(tiny_fp8_ckpt) as c:
        c.validate()
        c.total_bytes()
        for n in c.names():
            c.info(n)
    headers = [8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in c.shard_files()]
    assert sum(read) == sum(headers)


def write_sparse_checkpoint(path: Path, shards: int) -> int:
    """The real Step-3 (BF16, with vision) as headers over sparse files: ~640 GB that occupy no disk."""
    cfg = PRESETS["step3"]
    specs = tensor_specs(cfg)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    wmap, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for s in specs[k::shards]:
            nbytes = 2 * s.numel
            header[s.name] = {"dtype": "BF16", "shape": list(s.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            wmap[s.name] = file
        raw = json.dumps(header).encode()
        with open(path / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        total += offset
    write_index(path, wmap)
    return total


def test_full_size_step3_is_validated_instantly(tmp_path):
    total = write_sparse_checkpoint(tmp_path / "step3", shards=4)
    start = time.perf_counter()
    with HFCheckpoint(tmp_path / "step3") as c:
        c.validate()
        assert c.total_bytes() == total > 600e9
        assert c.info("model.layers.59.moe.down_proj.weight").shape == (48, 7168, 5120)
        assert c.has_vision and not c.is_fp8
    assert time.perf_counter() - start < 5.0


# ---- opening errors ----------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pt", "model.pth"])
def test_pickle_checkpoints_are_refused_unopened(tiny_ckpt, tmp_path, name):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    shutil.copy(tiny_ckpt / "config.json", ckpt)
    (ckpt / name).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"pickle checkpoints are not loaded \(unsafe\); convert to "
                                              r"safetensors first") as e:
        HFCheckpoint(ckpt)
    assert name in str(e.value)
    assert not marker.exists()


def test_opening_errors(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        HFCheckpoint(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json and no model.safetensors"):
        HFCheckpoint(empty)
    ckpt = copy(tiny_ckpt, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json: not found"):
        HFCheckpoint(ckpt)


@pytest.mark.parametrize(("text", "words"), [
    ('{"weight_map": {"a": ', "not valid JSON"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', "model.norm.weight"),
    ("[1, 2]", "no 'weight_map'"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_broken_index_names_the_index(tiny_ckpt, tmp_path, text, words):
    ckpt = copy(tiny_ckpt, tmp_path)
    index = ckpt / INDEX_FILE
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=words) as e:
        HFCheckpoint(ckpt)
    assert str(index) in str(e.value)


@pytest.mark.parametrize(("field", "value"), [("hidden_size", "320"), ("num_attention_groups", 2),
                                              ("moe_layers_enum", "2,x")])
def test_bad_config_is_a_config_error(tiny_ckpt, tmp_path, field, value):
    ckpt = copy(tiny_ckpt, tmp_path)
    d = json.loads((ckpt / "config.json").read_text())
    d["text_config"][field] = value
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=field) as e:
        HFCheckpoint(ckpt)
    assert str(ckpt / "config.json") in str(e.value)


# ---- validate(): one problem at a time ---------------------------------------------------------------
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
ROUTER = "model.layers.2.moe.gate.weight"
NORM = "model.layers.0.input_layernorm.weight"
EXPERTS = "model.layers.3.moe.down_proj.weight"


def _fp8(tensors: Tensors, name: str) -> None:
    tensors[name], tensors[scale_name(name)] = quantize_fp8(tensors[name])


TENSOR_EDITS = [  # (id, checkpoint fixture, edit, words the one problem must contain)
    ("missing", "tiny_ckpt", lambda t: t.pop(Q_PROJ), [Q_PROJ, "missing", "[192, 320]"]),
    ("unexpected", "tiny_ckpt", lambda t: t.update({"model.layers.0.mlp.bias": torch.ones(3)}),
     ["model.layers.0.mlp.bias", "unexpected tensor"]),
    ("shape", "tiny_ckpt", lambda t: t.update({Q_PROJ: t[Q_PROJ][:100]}),
     [Q_PROJ, "shape [100, 320]", "[192, 320]"]),
    ("dtype", "tiny_ckpt", lambda t: t.update({NORM: t[NORM].double()}), [NORM, "dtype F64"]),
    ("int dtype", "tiny_ckpt", lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.int32)}),
     [Q_PROJ, "dtype I32"]),
    ("fp8 router", "tiny_ckpt", lambda t: t.update({ROUTER: t[ROUTER].to(FP8_DTYPE)}),
     [ROUTER, "router tensors must never be quantized"]),
    ("fp8 norm scale", "tiny_ckpt", lambda t: t.update({scale_name(NORM): torch.ones(1, 1)}),
     [scale_name(NORM), "unexpected FP8 scale", "never quantized"]),
    ("scale without fp8", "tiny_ckpt", lambda t: t.update({scale_name(Q_PROJ): torch.ones(2, 3)}),
     [scale_name(Q_PROJ), "stored as BF16"]),
    ("fp8 without scale", "tiny_fp8_ckpt", lambda t: t.pop(scale_name(EXPERTS)), [EXPERTS, "without its"]),
    ("scale dtype", "tiny_fp8_ckpt",
     lambda t: t.update({scale_name(EXPERTS): t[scale_name(EXPERTS)].bfloat16()}),
     [scale_name(EXPERTS), "dtype BF16", "expected F32"]),
    ("scale shape", "tiny_fp8_ckpt",
     lambda t: t.update({scale_name(EXPERTS): t[scale_name(EXPERTS)][:, :1]}),
     [scale_name(EXPERTS), "shape [8, 1, 2]", str(list(scale_shape((8, 320, 192))))]),
    ("fp8 e5m2", "tiny_ckpt", lambda t: t.update({Q_PROJ: t[Q_PROJ].to(torch.float8_e5m2)}),
     [Q_PROJ, "dtype F8_E5M2"]),
]


@pytest.mark.parametrize(("fixture", "edit", "words"), [e[1:] for e in TENSOR_EDITS],
                         ids=[e[0] for e in TENSOR_EDITS])
def test_each_tensor_problem_is_named(request, tmp_path, fixture, edit, words):
    ckpt = copy(request.getfixturevalue(fixture), tmp_path)
    rewrite(ckpt, edit)
    only_problem(ckpt, *words)


def test_fp8_router_with_scale(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path)
    rewrite(ckpt, lambda t: _fp8(t, ROUTER))
    found = problems(ckpt)
    assert len(found) == 2
    assert any(ROUTER + ":" in p and "never be quantized" in p for p in found)
    assert any(scale_name(ROUTER) in p and "unexpected FP8 scale" in p for p in found)


def test_every_problem_is_listed_at_once(tiny_fp8_ckpt, tmp_path):
    ckpt = copy(tiny_fp8_ckpt, tmp_path)

    def many(t: Tensors) -> None:
        t.pop("lm_head.weight")
        t.pop(scale_name(Q_PROJ))
        t[NORM] = t[NORM][:10]
        t["extra.weight"] = torch.ones(2)

    rewrite(ckpt, many)
    found = problems(ckpt)
    assert len(found) == 4
    for name in ("lm_head.weight", Q_PROJ, NORM, "extra.weight"):
        assert sum(name in p for p in found) == 1, name


def test_missing_shard(tiny_fp8_ckpt, tmp_path):
    ckpt = copy(tiny_fp8_ckpt, tmp_path)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    only_problem(ckpt, "model-00002-of-00002.safetensors", "missing, but the index maps")
    with HFCheckpoint(ckpt) as c, pytest.raises(CheckpointError, match="00002-of-00002.safetensors: missing"):
        c.get("lm_head.weight")


def test_shard_name_outside_the_directory(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path)
    wmap = weight_map(ckpt)
    wmap["model.norm.weight"] = "../model-00001-of-00001.safetensors"
    write_index(ckpt, wmap)
    found = problems(ckpt)
    assert any("'../model-00001-of-00001.safetensors' is not a plain file name" in p for p in found)
    unindexed = "model.norm.weight: stored in model-00001-of-00001.safetensors but not listed"
    assert any(unindexed in p for p in found)


def test_index_entry_absent_from_shard(tiny_fp8_ckpt, tmp_path):
    ckpt = copy(tiny_fp8_ckpt, tmp_path)
    wmap = weight_map(ckpt)
    name = next(n for n, f in wmap.items() if f.startswith("model-00002"))
    wmap[name] = "model-00001-of-00002.safetensors"
    write_index(ckpt, wmap)
    found = problems(ckpt)
    assert sorted(found) == sorted([
        f"{name}: listed in the index under model-00001-of-00002.safetensors, but that shard's header does "
        "not contain it",
        f"{name}: stored in model-00002-of-00002.safetensors but not listed in the index",
    ])
    with HFCheckpoint(ckpt) as c, pytest.raises(CheckpointError, match="header does not contain it"):
        c.get(name)


def _header_len(shard: Path) -> int:
    return struct.unpack("<Q", shard.read_bytes()[:8])[0]


SHARD_DAMAGE = [  # (id, damage(bytes) -> bytes, words)
    ("empty", lambda b: b[:5], "too short for a safetensors file"),
    ("truncated header", lambda b: b[:100], "runs past the end"),
    ("garbage", lambda b: bytes(range(256)) * 4, "runs past the end"),
    ("not json", lambda b: b[:8] + b"{" + b"\x00" * (_len(b) - 1) + b[8 + _len(b):], "not valid JSON"),
    ("not an object", lambda b: b[:8] + b"{" + b" " * (_len(b) - 2) + b"x" + b[8 + _len(b):],
     "not valid JSON"),
    ("short data", lambda b: b[:-1], "shorter than its header says"),
    ("stray bytes", lambda b: b + b"\x00" * 4, "4 stray bytes after the last tensor"),
    ("bad dtype", lambda b: b.replace(b'"BF16"', b'"BF17"', 1), "unsupported dtype 'BF17'"),
    ("bad offsets", lambda b: b.replace(b'"data_offsets":[0,', b'"data_offsets":[2,', 1),
     "spans 327678 bytes"),
]


def _len(b: bytes) -> int:
    return struct.unpack("<Q", b[:8])[0]


@pytest.mark.parametrize(("damage", "words"), [d[1:] for d in SHARD_DAMAGE], ids=[d[0] for d in SHARD_DAMAGE])
def test_damaged_shard(tiny_fp8_ckpt, tmp_path, damage, words):
    ckpt = copy(tiny_fp8_ckpt, tmp_path)
    shard = ckpt / "model-00001-of-00002.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    found = problems(ckpt)
    assert any(str(shard) in p and words in p for p in found), found
    with HFCheckpoint(ckpt) as c:
        lost = [n for n, f in c.weight_map.items() if f == shard.name]
        with pytest.raises(CheckpointError, match=str(shard)):
            c.get(lost[0])
        kept = next(n for n, f in c.weight_map.items() if f != shard.name)
        assert c.get(kept).numel() > 0  # the other shard still reads


def test_offsets_check_matches_the_rust_loader(tiny_ckpt, tmp_path):
    """A hand-made shard with a gap between tensors: we refuse it, as safetensors itself does."""
    ckpt = copy(tiny_ckpt, tmp_path)
    shard = ckpt / "model-00001-of-00001.safetensors"
    raw = shard.read_bytes()
    header = json.loads(raw[8: 8 + _len(raw)])
    meta = header.pop("__metadata__")
    first = min(header, key=lambda n: header[n]["data_offsets"][0])
    header[first]["data_offsets"][0] += 2  # shorter first tensor -> gap and size mismatch
    new = json.dumps({"__metadata__": meta, **header}).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + _len(raw):])
    with pytest.raises(CheckpointError, match=first):
        safetensors_io.read_header(shard)


def test_config_with_more_layers_than_the_files(tiny_ckpt, tmp_path):
    ckpt = copy(tiny_ckpt, tmp_path)
    d = json.loads((ckpt / "config.json").read_text())
    d["text_config"]["num_hidden_layers"] = 10**9  # also proves no billion-entry table is built
    (ckpt / "config.json").write_text(json.dumps(d))
    only_problem(ckpt, "decoder layers 6..999999999: missing entirely", "num_hidden_layers=1000000000")


def test_vision_tensors_without_vision_config(tiny_vision_ckpt, tmp_path):
    ckpt = copy(tiny_vision_ckpt, tmp_path)
    d = json.loads((ckpt / "config.json").read_text())
    del d["vision_config"]
    (ckpt / "config.json").write_text(json.dumps(d))
    found = problems(ckpt)
    with HFCheckpoint(ckpt) as c:
        n_vision = sum(1 for n in c.names() if not n.startswith(("model.", "lm_head")))
    assert found[0].startswith(f"config.json has no vision_config, but the checkpoint holds {n_vision}")
    assert len(found) == 1 + n_vision


def test_get_errors(tiny_fp8_ckpt, tmp_path):
    with HFCheckpoint(tiny_fp8_ckpt) as c, pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        c.get("nope")
    ckpt = copy(tiny_fp8_ckpt, tmp_path)
    wmap = weight_map(ckpt)
    del wmap[scale_name(Q_PROJ)]
    write_index(ckpt, wmap)
    with HFCheckpoint(ckpt) as c, pytest.raises(CheckpointError, match=f"{Q_PROJ} is stored as FP8 but"):
        c.get_weight(Q_PROJ)


def test_scale_shape_mismatch_on_get_weight(tiny_fp8_ckpt, tmp_path):
    ckpt = copy(tiny_fp8_ckpt, tmp_path)
    rewrite(ckpt, lambda t: t.update({scale_name(Q_PROJ): torch.ones(5, 5)}))
    with HFCheckpoint(ckpt) as c, pytest.raises(Step3Error, match=scale_name(Q_PROJ)):
        c.get_weight(Q_PROJ)
