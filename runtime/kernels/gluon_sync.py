"""mbarrier helpers shared by the warp-specialized Gluon kernels (Hopper, fp8_linear.GLUON_TRITONS)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy

WARPGROUP_THREADS = gl.constexpr(128)


@gluon.jit
def release(bar):
    """A consumer warpgroup frees a ring stage: each of its threads arrives on `bar`, whose count is
    WARPGROUP_THREADS per warpgroup that releases it (`.noinc`: the count stays as initialized).
    Gluon's `mbarrier.arrive` is thread 0's behind a bar.sync of the warpgroup, a stall each time the ring
    turns (NOTES_mfa.md run 14: 1-2% of the FP8 decode loop)."""
    async_copy.mbarrier_arrive(bar, increment_count=False)
