"""benchmarks/mfa_attention.py's launch tuning: a launch is scored, and used in the sweep, only where it runs
the kernel (Gluon or Triton) that the library's plan picks. Runs anywhere: plan_decode with a split count
given asks no GPU."""

import math

from benchmarks.mfa_attention import launch_kw, same_kernel, score

GLUON = launch_kw((64, 4, 4, 2048, 2, 0, 2, 2))
TRITON = launch_kw((32, 4, 3, 512, 0, 1, 0, 0))


def test_same_kernel_follows_the_plan():
    assert same_kernel(GLUON, 256, 4096, 64, fp8=True)  # the plan runs the Gluon kernel there
    assert not same_kernel(GLUON, 1, 8192, 64, fp8=True)  # and the fp16-dot Triton launch here
    assert same_kernel(TRITON, 1, 8192, 64, fp8=True) and not same_kernel(TRITON, 256, 4096, 64, fp8=True)
    assert same_kernel({}, 1, 8192, 64, fp8=True)  # the default: everywhere
    assert same_kernel(GLUON, 1, 8192, 64, fp8=False)  # BF16 never takes the Gluon kernel


def test_score_counts_only_the_shapes_a_launch_ran():
    default, pairs, slow = [180.0, 40.0, 20.0], [174.0, 40.0, None], [190.0, 44.0, 30.0]
    s = score([default, pairs, slow])
    assert s[1] < s[0] < s[2]  # pairs: faster where it ran, not charged for the shape it skipped
    assert s[1] == 0.0 and score([[10.0, None], [None, None]])[1] == math.inf
