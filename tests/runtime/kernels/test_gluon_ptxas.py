"""ptxas's verdict on the Gluon kernels as the library launches them, compiled for sm_90a (no GPU needed).

What no output check sees: ptxas serializing every wgmma of a kernel (C7510-C7515, "Potential Performance
Loss") halves its speed silently, and it happened each time a consumer ran short of registers (NOTES_mfa.md
runs 12 and 14, NOTES_ffn.md runs 6-9). Needs a Triton the kernels are written against (GLUON_TRITONS:
3.6-3.9) and the ptxas it picks for sm_90; elsewhere the module is skipped, like the GPU tests off a GPU.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton

from runtime.kernels.fp8_linear import GLUON_TRITONS

pytestmark = pytest.mark.skipif(not triton.__version__.startswith(GLUON_TRITONS),
                                reason="a Triton the Gluon kernels are written against, and its ptxas")


# The compile runs in a child process with TRITON_INTERPRET=0: without a GPU the kernel tests' conftest turns
# the interpreter on, under which Triton's @jit helpers are interpreter objects that patch triton.language
# for good when called (a Gluon compile in this process then fails; with a warm Triton cache it went unseen).
_COMPILE = """
import importlib, inspect, json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource

spec = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(spec["module"]), spec["name"])
names = list(inspect.signature(fn.fn).parameters)
sig = {n: "constexpr" if n in spec["constexprs"] else spec["types"].get(n, "i32") for n in names}
attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
         if sig[n].startswith("*") or n.startswith("stride")}
kernel = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=spec["constexprs"], attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
ptxas = get_ptxas(90).path  # Triton's own choice: 3.9 runs sm_90a through its newer ptxas-blackwell
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(kernel.asm["ptx"])
    run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                         capture_output=True, text=True, check=True)
print(run.stderr)
"""


def _ptxas(fn, types: dict, constexprs: dict) -> str:
    """fn compiled for sm_90a with `types` for its runtime arguments (i32 where absent), then `ptxas -v`'s
    report."""
    spec = dict(module=fn.fn.__module__, name=fn.fn.__name__, types=types, constexprs=constexprs)
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(spec)], capture_output=True, text=True,
                         env=os.environ | {"TRITON_INTERPRET": "0"})
    assert run.returncode == 0, f"compiling {spec['name']} failed:\n{run.stderr[-4000:]}"
    return run.stdout


def _serialized(report: str) -> bool:
    return "Potential Performance Loss" in report or re.search(r"C751\d", report) is not None


def _spill_bytes(report: str) -> int:
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


def _fp8_desc(rows: int) -> str:
    from triton.experimental.gluon import language as gl

    layout = gl.NVMMASharedLayout.get_default_for([rows, 128], gl.float8e4nv)
    return f"tensordesc<fp8e4nv[{rows}, 128],{layout!r}>"


@pytest.mark.parametrize("page", [64, 16])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "split"])
def test_fp8_decode_consumer_keeps_its_wgmma_pipeline(page, direct):
    """The library's FP8 decode launch (mfa_plan's table): no wgmma serialization and no spills, but for the
    one or two registers Triton 3.9's build spills (4 B direct, 8 B split: stored and reloaded before the tile
    loop, reloaded once after it, read in its SASS; NOTES_mfa.md session 18): any more is new."""
    from runtime.kernels.kv_cache import FP8_DTYPE
    from runtime.kernels.mfa_decode_ws import _mfa_decode_ws_kernel, kernel_constexprs
    from runtime.kernels.mfa_plan import plan_decode

    plan = plan_decode(256, 4096, 256, torch.device("cuda"), FP8_DTYPE, page, num_splits=1 if direct else 4)
    assert plan.gluon and plan.num_splits == (1 if direct else 4)
    consts = kernel_constexprs(64, page, plan.block_n, plan.num_stages, plan.gluon_vstages, direct,
                               vec=plan.gluon_vec, pair=plan.gluon == 2, pdl=plan.pdl)
    desc = _fp8_desc(min(page, plan.block_n))
    types = dict(q_ptr="*bf16", k_desc=desc, v_desc=desc, bt_ptr="*i32", lens_ptr="*i32", k_scale_ptr="*fp32",
                 v_scale_ptr="*fp32", out_ptr="*bf16", part_o_ptr="*fp16", part_lse_ptr="*fp32",
                 sm_scale_log2="fp32")
    report = _ptxas(_mfa_decode_ws_kernel, types, consts)
    assert not _serialized(report), report
    assert _spill_bytes(report) <= 8, report


@pytest.mark.parametrize("name", ["wsp192g4_side", "wsp192g8", "wspsd_side"])
@pytest.mark.parametrize("gemm", ["gate_up", "down"])
def test_moe_gemm_keeps_its_wgmma_pipeline(name, gemm):
    """The persistent grouped GEMM at the MoE defaults from 2048 tokens and the DEFER tile: no wgmma
    serialization (the 3-consumer QUANT kernel spills ~130 B today; that is not what this guards)."""
    from runtime.kernels.fp8_gemm_wsp import ROW_SCALES_LAYOUT, _wsp_gemm_kernel, kernel_constexprs
    from runtime.kernels.moe import MOE_CANDIDATES

    cfg = MOE_CANDIDATES[name]
    quant = gemm == "gate_up"
    stages = cfg.stages_gate_up if quant else cfg.stages_down
    consts = kernel_constexprs(quant, not quant, cfg.block_m, cfg.group_m, stages, cfg.skip_pad, cfg.defer)
    b_rows = 64 if quant else 128
    types = dict(a_desc=_fp8_desc(64), b_desc=_fp8_desc(b_rows), b2_desc=_fp8_desc(b_rows),
                 as_desc=f"tensordesc<fp32[1, 64],{ROW_SCALES_LAYOUT!r}>", bs_ptr="*fp32",
                 b2s_ptr="*fp32", c_ptr="*fp8e4nv" if quant else "*bf16", cs_ptr="*fp32",
                 block_expert_ptr="*i32", rows_ptr="*i32", topk_w_ptr="*fp32", counter_ptr="*i32")
    report = _ptxas(_wsp_gemm_kernel, types, consts)
    assert not _serialized(report), report
