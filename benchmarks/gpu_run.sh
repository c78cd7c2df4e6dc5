#!/usr/bin/env bash
# One call on the H200 (device tool): every GPU-marked test and the Gluon ptxas checks, then both kernel
# benchmarks and the MoE clocks (the layer and cuBLAS, rested and at the power cap), each under its own time
# limit so one slow part cannot eat the others' time. Logs and results land under $OUT.
#   bash benchmarks/gpu_run.sh            (from the repository root, with OUT set)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT/moe" "$OUT/mfa"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "gpu-marked tests: exit $? :: $(tail -n 1 "$OUT/gpu_tests.log")"
timeout 120 python3 -m pytest -q tests/runtime/kernels/test_gluon_ptxas.py -p no:cacheprovider \
    > "$OUT/ptxas_tests.log" 2>&1  # ptxas on the Gluon kernels: needs a Triton of GLUON_TRITONS, not a GPU
echo "ptxas tests: exit $? :: $(tail -n 1 "$OUT/ptxas_tests.log")"
timeout 540 python3 -m benchmarks.moe_ffn --out "$OUT/moe" > "$OUT/moe/run.log" 2>&1
echo "moe_ffn: exit $?"; tail -n 25 "$OUT/moe/run.log"
timeout 120 python3 -m benchmarks.moe_clocks --out "$OUT/moe" --tokens 2048 4096 8192 > "$OUT/moe/clocks.log" 2>&1
echo "moe_clocks (rested / sustained, SM clock, power): exit $?"; tail -n 4 "$OUT/moe/clocks.log"
timeout 300 python3 benchmarks/mfa_attention.py --tests --out "$OUT/mfa" > "$OUT/mfa/run.log" 2>&1
echo "mfa_attention: exit $?"; tail -n 25 "$OUT/mfa/run.log"
ls -la "$OUT" "$OUT/moe" "$OUT/mfa"
