"""Is Triton's E4M3 x E4M3 `tl.dot` right on this GPU for MFA's q K^T shape? (issue 5, NOTES_mfa.md)

The FP8-native q K^T of the decode kernel (q split into E4M3 hi + lo, commit 4cd5324) was fast on the H200
but wrong, while a register-operand variant passed. This probe isolates the one suspect left: an E4M3 A
operand [64, D] that the wgmma reads from shared memory (loaded from global memory), against the K tile's
E4M3 B operand (trans of [BLOCK_N, D]), at D = 256 (two 128-byte swizzle atoms per row) and D = 128,
and the same dot with A made in registers (quantized inside the kernel), each alone and as two dots
chained into one accumulator (hi + lo, as 4cd5324 did). Each case prints its relative error against
torch in float64; a wrong operand layout gives errors of order 1, the FP8 MMA's reduced-precision
accumulation ~1e-4 at most, so anything above 1e-3 is called wrong.

    python benchmarks/fp8_dot_probe.py            (on a GPU; TRITON_INTERPRET=1 on a CPU)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn


@triton.jit
def _qk_kernel(a_ptr, x_ptr, k_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
               A_IN_REGISTERS: tl.constexpr, CHAIN: tl.constexpr):
    m, n, d = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    k = tl.trans(tl.load(k_ptr + n[:, None] * D + d[None, :]))
    s = tl.zeros((M, N), dtype=tl.float32)
    for i in tl.static_range(2 if CHAIN else 1):  # CHAIN: A rows i*M.. as a second dot into s
        rows = (i * M + m)[:, None] * D + d[None, :]
        if A_IN_REGISTERS:  # noqa: SIM108 - quantized here from fp32 (on the E4M3 grid already: exact)
            a = tl.load(x_ptr + rows).to(tl.float8e4nv)
        else:  # loaded as E4M3 from global memory: the wgmma reads it from shared memory
            a = tl.load(a_ptr + rows)
        s = tl.dot(a, k, s, out_dtype=tl.float32)
    tl.store(out_ptr + m[:, None] * N + n[None, :], s)


def case(m: int, n: int, d: int, a_in_registers: bool, chain: bool, device: str,
         gen: torch.Generator) -> float:
    """Relative error of one E4M3 q K^T (or two chained) against float64 torch on fresh E4M3 values."""
    a = (torch.randn(2 * m, d, generator=gen) * 40).clamp(-448, 448).to(FP8)
    k = (torch.randn(n, d, generator=gen) * 40).clamp(-448, 448).to(FP8)
    out = torch.empty(m, n, dtype=torch.float32, device=device)
    _qk_kernel[(1,)](a.to(device), a.float().to(device), k.to(device), out, M=m, N=n, D=d,
                     A_IN_REGISTERS=a_in_registers, CHAIN=chain, num_warps=4)
    a64 = a.double()
    ref = (a64[:m] + (a64[m:] if chain else 0)) @ k.double().t()
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    print(f"triton {triton.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU interpreter'}")
    for d in (128, 256):
        for n in (32, 64):
            for regs in (False, True):
                for chain in (False, True):
                    err = case(64, n, d, regs, chain, device, gen)
                    where = "registers" if regs else "shared   "
                    print(f"M 64  N {n:3d}  D {d}  A {where}  {'two dots' if chain else 'one dot '}  "
                          f"rel err {err:.2e}  {'ok' if err < 1e-3 else 'WRONG'}")


if __name__ == "__main__":
    main()
