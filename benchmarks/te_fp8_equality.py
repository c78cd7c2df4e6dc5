"""TE-vs-torch block-FP8 byte equality on a GPU, with versions and per-case results (run on the H200).

Usage: python benchmarks/te_fp8_equality.py OUT.json
Prints one line per case and a summary; writes the same as JSON. Cases with subnormal inputs
(1e-40) are reported, not required: real weights never hold them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from quant.backends import quantize_weight
from quant.fp8 import quantize_fp8
from quant.te_backend import te_quantize_fp8, te_version

SHAPES = [(128, 128), (300, 200), (1, 1), (129, 257), (512, 384), (4, 300, 200), (3, 256, 1000),
          (2048, 7168), (8, 640, 896)]
MAGNITUDES = {"randn*0.02": 0.02, "randn*1e3": 1e3, "randn*1e-30": 1e-30, "subnormal 1e-40": 1e-40}


def _case(shape, dtype, label, mag, seed) -> dict:
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * mag).to(dtype)
    if len(shape) >= 2 and shape[-1] > 128 and shape[-2] > 128:
        w[..., :128, 128:256] = 0  # an all-zero block
    q_t, s_t = quantize_fp8(w)
    q_e, s_e = quantize_weight(w, "te", device="cuda")
    diff = int((q_t.view(torch.uint8) != q_e.view(torch.uint8)).sum())
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "input": label,
            "scale_shape": list(s_e.shape), "q_bytes_differ": diff,
            "scales_equal": bool(torch.equal(s_t, s_e)), "equal": diff == 0 and bool(torch.equal(s_t, s_e))}


def _timing() -> dict:
    """Quantize one 18432x7168 bf16 matrix (a dense MLP weight of the real model) on the GPU."""
    w = torch.randn(18432, 7168, device="cuda").to(torch.bfloat16)
    out = {}
    for name, fn in (("torch_cuda", lambda: quantize_fp8(w)), ("te", lambda: te_quantize_fp8(w))):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        out[name + "_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
    return out


def main(path: str) -> None:
    rows = []
    for i, shape in enumerate(SHAPES):
        for dtype in (torch.float32, torch.bfloat16):
            for label, mag in MAGNITUDES.items():
                rows.append(_case(shape, dtype, label, mag, seed=i))
                r = rows[-1]
                print(f"{str(tuple(shape)):>16} {r['dtype']:>9} {label:>16} "
                      f"scale{tuple(r['scale_shape'])!s:>14} "
                      f"q_diff={r['q_bytes_differ']:<6} scales_equal={r['scales_equal']} -> "
                      f"{'EQUAL' if r['equal'] else 'DIFFERENT'}")
    required = [r for r in rows if not r["input"].startswith("subnormal")]
    summary = {"te_version": te_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(), "cases": len(rows),
               "required_equal": sum(r["equal"] for r in required), "required_total": len(required),
               "subnormal_equal": sum(r["equal"] for r in rows if r not in required), **_timing()}
    print(json.dumps(summary))
    with open(path, "w") as f:
        json.dump({"summary": summary, "cases": rows}, f, indent=1)
    sys.exit(0 if summary["required_equal"] == summary["required_total"] else 1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the JSON file to write, e.g. benchmarks/results/te_fp8_equality.json")
    main(ap.parse_args().out)
