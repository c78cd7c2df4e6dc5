"""quant/quantize.py on step3-tiny: HF and AFD inputs, the four modes, --skip, errors, resume, logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from converters.afd import AFDLayout
from converters.convert import hf_to_afd
from converters.errors import Step3Error
from converters.hf import HFCheckpoint
from converters.names import is_scale_name, scale_name, spec_table
from quant.check import check_quantized
from quant.fp8 import FP8_DTYPE, dequantize_fp8, quantize_fp8, scale_grid_shape
from quant.quantize import QuantizeOptions, quantize_checkpoint
from quant.record import kv_cache_dtype
from quant.report import REPORT_FILE


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF checkpoint or AFD layout, under HF names (AFD slices reassembled)."""
    if (path / "manifest.json").is_file():
        view = AFDLayout(path).hf_view()
        return {n: view.get(n) for n in view.names()}
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module")
def q_hf(tiny_ckpt: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "fp8"
    quantize_checkpoint(tiny_ckpt, out, QuantizeOptions())
    return out


def test_hf_quantize_matches_pure_function_and_leaves_the_rest(tiny_ckpt, q_hf):
    src, got = tensors(tiny_ckpt), tensors(q_hf)
    specs = spec_table(HFCheckpoint(tiny_ckpt).config)
    assert set(got) == set(src) | {scale_name(n) for n in src if specs[n].quantize}
    for name, w in src.items():
        if specs[name].quantize:
            q, s = quantize_fp8(w, name=name)
            assert got[name].dtype == FP8_DTYPE and same_bytes(got[name], q), name
            assert tuple(got[scale_name(name)].shape) == scale_grid_shape(w.shape)
            assert same_bytes(got[scale_name(name)], s), name
        else:  # routers, embeddings, lm_head, norms
            assert same_bytes(got[name], w), name
    HFCheckpoint(q_hf).validate()


def test_hf_output_equals_the_synthesized_fp8_twin(tiny_fp8_ckpt, q_hf):
    """synth --fp8 quantizes the same BF16 values on its own path: the tensors must agree bit for bit."""
    twin, got = tensors(tiny_fp8_ckpt), tensors(q_hf)
    assert set(twin) == set(got)
    assert all(same_bytes(got[n], twin[n]) for n in twin)


def test_config_record_and_report(q_hf):
    cfg = json.loads((q_hf / "config.json").read_text())
    q = cfg["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert q["step3"]["backend"] == "torch" and kv_cache_dtype(q) == "fp8"
    assert "ignored_layers" not in q
    rep = json.loads((q_hf / REPORT_FILE).read_text())
    groups = rep["groups"]
    assert groups["routed_experts"]["quantized"] == groups["routed_experts"]["tensors"] == 6
    assert groups["router"]["quantized"] == 0 and groups["norm"]["mean_rel_error"] is None
    for g in ("attention", "dense_mlp", "shared_expert", "routed_experts"):
        # E4M3 keeps 3 mantissa bits: a few percent relative error, about 30 dB SNR on Gaussian weights
        assert 0.005 < groups[g]["mean_rel_error"] < 0.05 and 25 < groups[g]["snr_db"] < 40, g
    total = rep["total"]
    assert total["bytes_after"] < 0.6 * total["bytes_before"]


def test_skip_keeps_matching_weights_byte_identical(tiny_ckpt, tmp_path):
    options = QuantizeOptions(skip=r"layers\.1\.|moe\.up_proj", kv_cache="bf16")
    quantize_checkpoint(tiny_ckpt, tmp_path / "o", options)
    src, got = tensors(tiny_ckpt), tensors(tmp_path / "o")
    specs = spec_table(HFCheckpoint(tiny_ckpt).config)
    kept = [n for n in src if ("layers.1." in n or "moe.up_proj" in n) and specs[n].quantize]
    assert kept and all(same_bytes(got[n], src[n]) and scale_name(n) not in got for n in kept)
    assert got["model.layers.2.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    q = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert sorted(q["ignored_layers"]) == sorted(n.removesuffix(".weight") for n in kept)
    assert kv_cache_dtype(q) == "bf16"


def test_fp8_input_passes_through_unchanged(tiny_fp8_ckpt, tmp_path):
    r = quantize_checkpoint(tiny_fp8_ckpt, tmp_path / "o", QuantizeOptions(backend="torch"))
    assert r.mode == "passthrough" and r.backend is None
    src, got = tensors(tiny_fp8_ckpt), tensors(tmp_path / "o")
    assert set(src) == set(got) and all(same_bytes(got[n], src[n]) for n in src)
    q = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert q["weight_block_size"] == [128, 128] and kv_cache_dtype(q) == "fp8"


def test_requantize_keeps_the_fp8_grid(tiny_fp8_ckpt, tmp_path):
    r = quantize_checkpoint(tiny_fp8_ckpt, tmp_path / "o", QuantizeOptions(requantize=True))
    assert r.mode == "requantize"
    src, got = tensors(tiny_fp8_ckpt), tensors(tmp_path / "o")
    for n, t in src.items():
        if t.dtype == FP8_DTYPE:  # dequantized values sit on the FP8 grid: the same codes come back
            assert same_bytes(got[n], t), n
            assert torch.allclose(got[scale_name(n)], src[scale_name(n)], rtol=1e-6, atol=0), n
    assert r.report.total.max_rel_error < 1e-6


def test_dequantize_back_to_bf16(tiny_fp8_ckpt, tmp_path):
    quantize_checkpoint(tiny_fp8_ckpt, tmp_path / "o", QuantizeOptions(dequantize=True))
    src, got = tensors(tiny_fp8_ckpt), tensors(tmp_path / "o")
    assert not any(is_scale_name(n) for n in got)
    for n, t in src.items():
        if t.dtype == FP8_DTYPE:
            assert got[n].dtype == torch.bfloat16
            assert torch.equal(got[n], dequantize_fp8(t, src[scale_name(n)], dtype=torch.bfloat16)), n
        elif not is_scale_name(n):
            assert same_bytes(got[n], t)
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())
    assert not HFCheckpoint(tmp_path / "o").is_fp8


def test_afd_input_equals_quantize_then_convert(tiny_ckpt, q_hf, tmp_path):
    """quantize(convert(x)) == convert(quantize(x)), tensor for tensor, and the manifest records it."""
    hf_to_afd(tiny_ckpt, tmp_path / "afd", ffn_ranks=2)
    r = quantize_checkpoint(tmp_path / "afd", tmp_path / "afd-fp8", QuantizeOptions(kv_cache="bf16"))
    assert r.kind == "afd" and r.mode == "quantize"
    layout = AFDLayout(tmp_path / "afd-fp8")
    record = layout.quantization
    assert record["weight_block_size"] == [128, 128] and kv_cache_dtype(record) == "bf16"
    expert = "ffn/rank-1:model.layers.2.moe.gate_proj.weight"  # experts 4..7 of 8, scales follow
    assert layout.pieces[expert].dtype == "F8_E4M3"
    assert layout.pieces[expert + "_scale_inv"].slice == ((0, 4, 8),)
    want, got = tensors(q_hf), tensors(tmp_path / "afd-fp8")
    assert set(want) == set(got) and all(same_bytes(got[n], want[n]) for n in want)


def test_afd_fp8_round_trip_and_vision_untouched(tiny_vision_ckpt, tmp_path):
    hf_to_afd(tiny_vision_ckpt, tmp_path / "afd", ffn_ranks=2)
    quantize_checkpoint(tmp_path / "afd", tmp_path / "fp8", QuantizeOptions())
    quantize_checkpoint(tmp_path / "fp8", tmp_path / "bf16", QuantizeOptions(dequantize=True))
    again = quantize_checkpoint(tmp_path / "fp8", tmp_path / "same", QuantizeOptions())
    src, fp8 = tensors(tiny_vision_ckpt), tensors(tmp_path / "fp8")
    same = tensors(tmp_path / "same")
    assert again.mode == "passthrough" and all(same_bytes(same[n], fp8[n]) for n in fp8)
    vision = [n for n in src if n.startswith(("vision_model", "vit_"))]
    assert vision and all(same_bytes(fp8[n], src[n]) for n in vision)
    back = tensors(tmp_path / "bf16")
    assert set(back) == set(src)
    assert torch.allclose(back["model.layers.0.mlp.up_proj.weight"].float(),
                          src["model.layers.0.mlp.up_proj.weight"].float(), rtol=0.07, atol=1e-3)


def test_logits_cosine_on_step3_tiny(tiny_ckpt, q_hf):
    c = check_quantized(tiny_ckpt, q_hf)
    assert c.passed and c.cosine_mean >= 0.99 and c.cosine_min > 0.98 and c.top1_agreement >= 0.8
    assert c.cosine_mean < 1.0  # the weights really changed


def test_nan_weight_is_named_and_output_not_complete(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    shard = next(src.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as h:
        data = {n: h.get_tensor(n) for n in h.keys()}  # noqa: SIM118
    data["model.layers.3.share_expert.down_proj.weight"][5, 7] = float("nan")
    save_file(data, str(shard), metadata={"format": "pt"})
    with pytest.raises(Step3Error, match=r"model\.layers\.3\.share_expert\.down_proj\.weight"):
        quantize_checkpoint(src, tmp_path / "o", QuantizeOptions())
    assert not (tmp_path / "o" / "config.json").exists()


@pytest.mark.parametrize(("options", "message"), [
    (QuantizeOptions(dequantize=True), "nothing to --dequantize"),
    (QuantizeOptions(skip="layers.(0"), "--skip"),
    (QuantizeOptions(kv_cache="int4"), "--kv-cache"),
    (QuantizeOptions(backend="fast"), "--backend"),
])
def test_bad_options_are_named(tiny_ckpt, tmp_path, options, message):
    with pytest.raises(Step3Error, match=message):
        quantize_checkpoint(tiny_ckpt, tmp_path / "o", options)
    with pytest.raises(Step3Error, match="OUT is the input"):
        quantize_checkpoint(tiny_ckpt, tiny_ckpt, QuantizeOptions())


def test_resume_finishes_and_still_reports_every_tensor(tiny_ckpt, q_hf, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(q_hf, out)
    first = json.loads((out / REPORT_FILE).read_text())
    # an interrupted run: the data file and the journal are there, the final files are not
    (out / "config.json").unlink()
    (out / REPORT_FILE).unlink()
    r = quantize_checkpoint(tiny_ckpt, out, QuantizeOptions(), resume=True)
    assert r.write.written == [] and r.write.skipped
    again = json.loads((out / REPORT_FILE).read_text())
    assert again["tensors"] == first["tensors"] and again["groups"] == first["groups"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_device_cuda_writes_the_same_checkpoint(tiny_ckpt, q_hf, tmp_path, backend):
    r = quantize_checkpoint(tiny_ckpt, tmp_path / "o", QuantizeOptions(device="cuda", backend=backend))
    want, got = tensors(q_hf), tensors(tmp_path / "o")
    assert set(want) == set(got) and all(same_bytes(got[n], want[n]) for n in want), r.backend


_PEAK = """
import sys, threading
from quant.quantize import QuantizeOptions, quantize_checkpoint

def anon():  # anonymous resident memory: file pages a writer maps while hashing do not count
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024

base, peak, done = anon(), [0], threading.Event()
def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], anon())
t = threading.Thread(target=sample)
t.start()
quantize_checkpoint(sys.argv[1], sys.argv[2], QuantizeOptions(backend="torch"))
done.set()
t.join()
print(max(peak[0], anon()) - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from Linux /proc")
def test_peak_memory_does_not_grow_with_model_size(make_ckpt, tmp_path):
    """Five times the layers (same tensor sizes) must not raise the quantize pass's peak RSS."""
    import subprocess
    import sys

    from converters.config import PRESETS

    peaks = {}
    for layers in (6, 30):
        cfg = PRESETS["step3-tiny"].replace(num_hidden_layers=layers)
        src = make_ckpt(cfg=cfg, name=f"l{layers}")
        proc = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / f"o{layers}")],
                              capture_output=True, text=True, timeout=600, check=True)
        peaks[layers] = int(proc.stdout.split()[-1])
    grew = sum(p.stat().st_size for p in (tmp_path / "l30").glob("*.safetensors")) / 5 * 4
    assert peaks[30] - peaks[6] < 0.25 * grew, (peaks, grew)
