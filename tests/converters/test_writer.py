"""converters/writer.py: streamed safetensors bytes, atomic files, resume, refusals, disk-space errors."""

from __future__ import annotations

import errno
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from converters import writer, writer_io
from converters.errors import Step3Error
from converters.writer import CopyFile, OutputPlan, SafetensorsFile, TensorOut, write_output


def _plan(tmp: Path, seed: int = 0, fingerprint: str = "test") -> tuple[OutputPlan, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.weight_scale_inv": torch.rand(1, 1, generator=g) + 0.5,
        "b.weight": torch.randn(4, 9, 5, generator=g).to(torch.float8_e4m3fn),
        "c.bias": torch.randn(7, generator=g),
    }
    outs = {k: TensorOut(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()}
    tok = tmp / "src_tokenizer.json"
    tok.write_text('{"vocab": [1, 2, 3]}')
    files = (SafetensorsFile("part/x.safetensors", (outs["a.weight"], outs["a.weight_scale_inv"])),
             SafetensorsFile("part/y.safetensors", (outs["b.weight"], outs["c.bias"]), {"format": "pt"}),
             CopyFile("tokenizer.json", tok))

    def final(records):
        return [("manifest.json", writer.json_bytes({k: v.to_json() for k, v in records.items()}))]

    return OutputPlan(files, final, fingerprint, ("manifest.json",)), tensors


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_files_load_with_safetensors_and_match_records(tmp_path):
    plan, tensors = _plan(tmp_path)
    out = tmp_path / "out"
    seen = []
    res = write_output(out, plan, progress=lambda d, t, label="": seen.append((d, t)))
    loaded = {**load_file(out / "part/x.safetensors"), **load_file(out / "part/y.safetensors")}
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8))
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, rec in manifest.items():
        data = (out / rel).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert res.records["part/x.safetensors"].bytes == plan.files[0].nbytes
    done = [d for d, _ in seen]
    assert seen[-1] == (plan.nbytes, plan.nbytes) and done == sorted(done)
    assert not list(out.rglob("*.partial"))


def test_output_is_byte_identical_across_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_output(a, _plan(tmp_path)[0])
    write_output(b, _plan(tmp_path)[0])
    assert _tree(a) == _tree(b)


def test_non_empty_out_is_refused_without_resume_or_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(Step3Error, match="not empty.*--resume.*--force"):
        write_output(out, _plan(tmp_path)[0])
    with pytest.raises(Step3Error, match="no record of an interrupted"):
        write_output(out, _plan(tmp_path)[0], resume=True)
    write_output(out, _plan(tmp_path)[0], force=True)
    assert (out / "precious.txt").read_text() == "mine"  # force never deletes what it did not write


def test_resume_skips_intact_files_and_rewrites_damaged_ones(tmp_path):
    out = tmp_path / "out"
    plan, _ = _plan(tmp_path)
    write_output(out, plan)
    reference = _tree(out)
    damaged = out / "part/y.safetensors"
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    res = write_output(out, plan, resume=True)
    assert res.skipped == ["part/x.safetensors", "tokenizer.json"] and res.written == ["part/y.safetensors"]
    assert _tree(out) == reference


def test_resume_with_other_inputs_is_refused(tmp_path):
    out = tmp_path / "out"
    write_output(out, _plan(tmp_path)[0])
    with pytest.raises(Step3Error, match="other inputs or options"):
        write_output(out, _plan(tmp_path, fingerprint="other")[0], resume=True)


def test_crash_mid_file_leaves_only_partial_and_resume_completes(tmp_path):
    plan, _ = _plan(tmp_path)
    reference = tmp_path / "ref"
    write_output(reference, plan)

    def crash() -> torch.Tensor:
        raise KeyboardInterrupt  # the process dies while y.safetensors is half written

    boom = SafetensorsFile("part/y.safetensors", (plan.files[1].tensors[0],
                           TensorOut("c.bias", torch.float32, (7,), crash)), {"format": "pt"})
    files = (plan.files[0], boom, plan.files[2])
    crashing = OutputPlan(files, plan.final, plan.fingerprint, plan.final_names)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_output(out, crashing)
    assert (out / "part/x.safetensors").is_file() and (out / "part/y.safetensors.partial").is_file()
    assert not (out / "part/y.safetensors").exists() and not (out / "manifest.json").exists()
    write_output(out, plan, resume=True)
    assert {k: v for k, v in _tree(out).items() if k != writer.JOURNAL} == \
        {k: v for k, v in _tree(reference).items() if k != writer.JOURNAL}


def test_enospc_mid_run_is_a_clear_error_and_resume_completes(tmp_path, monkeypatch):
    plan, _ = _plan(tmp_path)
    reference = tmp_path / "ref"
    write_output(reference, plan)
    real = writer._write_safetensors
    calls = {"n": 0}

    def full_disk(f, spec, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, spec, *args)

    monkeypatch.setattr(writer, "_write_safetensors", full_disk)
    out = tmp_path / "out"
    with pytest.raises(Step3Error, match=r"out of disk space while writing .*y\.safetensors.*--resume"):
        write_output(out, plan)
    assert not list(out.rglob("*.partial")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(writer, "_write_safetensors", real)
    res = write_output(out, plan, resume=True)
    assert res.skipped == ["part/x.safetensors"]
    assert _tree(out) == _tree(reference)


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    plan, _ = _plan(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 10})())
    out = tmp_path / "out"
    with pytest.raises(Step3Error, match=r"need .* MB, 0\.00 MB free"):
        write_output(out, plan)
    assert not list((out).rglob("*.safetensors"))


@pytest.mark.parametrize("kernel_copy", [True, False])
@pytest.mark.parametrize("same_page_offset", [True, False])
def test_file_range_producers_copy_exact_bytes(tmp_path, monkeypatch, kernel_copy, same_page_offset):
    """A producer may hand back a byte range of another file: copy_file_range when source and output
    offsets share their place in a page, else (or without it) read into a buffer + write."""
    monkeypatch.setattr(writer_io, "KERNEL_COPY", kernel_copy)
    monkeypatch.setattr(writer_io, "CHUNK", 4096)  # several chunks and hash windows per tensor
    monkeypatch.setattr(writer_io, "WINDOW", 8192)
    kernel_calls = []
    real_copy = writer_io.os.copy_file_range
    monkeypatch.setattr(writer_io.os, "copy_file_range", lambda *a: kernel_calls.append(a) or real_copy(*a),
                        raising=False)
    w = torch.randn(200, 30, generator=torch.Generator().manual_seed(2))
    rows = 10 * 30 * 4  # the range starts at row 10
    out_t = TensorOut("w", torch.float32, (180, 30), lambda: None)
    data_at = len(SafetensorsFile("a.safetensors", (out_t,)).header())  # where the tensor lands in the output
    junk = (data_at - rows) % writer_io.PAGE + (0 if same_page_offset else 4)
    src = tmp_path / "blob.bin"
    src.write_bytes(b"j" * junk + w.numpy().tobytes() + b"tail")
    assert ((junk + rows) % writer_io.PAGE == data_at % writer_io.PAGE) == same_page_offset
    r = writer.FileRange(src, junk + rows, 180 * 30 * 4)  # rows 10..189
    out_t = TensorOut("w", torch.float32, (180, 30), lambda: r)
    plan = OutputPlan((SafetensorsFile("a.safetensors", (out_t,)),), lambda _: [], "fr", ())
    res = write_output(tmp_path / "out", plan)
    written = (tmp_path / "out/a.safetensors").read_bytes()
    assert torch.equal(load_file(tmp_path / "out/a.safetensors")["w"], w[10:190])
    assert res.records["a.safetensors"].sha256 == hashlib.sha256(written).hexdigest()
    assert bool(kernel_calls) == (kernel_copy and same_page_offset)
    bad = TensorOut("v", torch.float32, (21, 30), lambda: r)
    with pytest.raises(Step3Error, match=r"v: expected F32 \[21, 30\].*got 21600 bytes"):
        write_output(tmp_path / "out2", OutputPlan((SafetensorsFile("b.safetensors", (bad,)),),
                                                   lambda _: [], "fr", ()))


def test_short_writes_are_continued(tmp_path):
    """A raw write may write less than asked; write_all goes on until every byte is in the file."""
    class Short:
        def __init__(self, f):
            self.f = f

        def tell(self) -> int:
            return self.f.tell()

        def write(self, b) -> int:
            return self.f.write(b[:7])

    data = np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8)
    counted = []
    with open(tmp_path / "f", "wb", buffering=0) as f:
        writer_io.write_all(Short(f), memoryview(data), counted.append)
    assert (tmp_path / "f").read_bytes() == data.tobytes() and sum(counted) == 3000


def test_file_hash_follows_the_writer(tmp_path, monkeypatch):
    """The hash thread reads back what was written so far, window by window, whatever the write sizes."""
    monkeypatch.setattr(writer_io, "WINDOW", 8192)
    data = np.random.default_rng(6).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    cuts = [0, 1, 4096, 4097, 30_000, 65_536, 99_999, 100_000]
    with ThreadPoolExecutor(1) as pool, open(tmp_path / "f", "wb", buffering=0) as f:
        digest = writer_io.FileHash(pool, tmp_path / "f")
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            f.write(data[a:b])
            digest.wrote(b - a)
        digest.close()
        assert digest.result.result() == hashlib.sha256(data).hexdigest()


def test_numpy_bit_producers_and_string_dtypes(tmp_path):
    """Converting hands the writer raw bits as numpy arrays (no torch), declared with safetensors dtype
    strings; a torch dtype declares the same tensor, and a wrong item size or shape is refused."""
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    bits = w.view(torch.int16).numpy().view(np.uint16)[:, 2:7]  # a strided column slice, as for down_proj
    out = TensorOut("w", "BF16", (6, 5), lambda: bits)
    assert TensorOut("w", torch.bfloat16, (6, 5), lambda: bits) == out and out.nbytes == 60
    plan = OutputPlan((SafetensorsFile("a.safetensors", (out,)),), lambda r: [], "np", ())
    write_output(tmp_path / "out", plan)
    assert torch.equal(load_file(tmp_path / "out/a.safetensors")["w"].view(torch.int16),
                       w[:, 2:7].view(torch.int16))
    for dtype, shape in (("F32", (6, 5)), ("BF16", (5, 6))):
        bad = SafetensorsFile("b.safetensors", (TensorOut("w", dtype, shape, lambda: bits),))
        with pytest.raises(Step3Error, match=rf"w: expected {dtype} .*got 2-byte items \[6, 5\]"):
            write_output(tmp_path / f"bad-{dtype}", OutputPlan((bad,), lambda r: [], "np", ()))
    with pytest.raises(Step3Error, match="complex64 cannot be stored in safetensors"):
        TensorOut("z", torch.complex64, (1,), lambda: bits)
