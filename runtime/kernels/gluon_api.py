"""The Gluon spellings that changed across the Tritons the Hopper kernels run on (fp8_linear.GLUON_TRITONS),
so that each kernel is written once.

- `tma_load`: Triton 3.8 renamed `tma.async_copy_global_to_shared` to `tma.async_load` (3.9 removed the old
  name);
- `PUBLIC_REINTERPRET`: Triton 3.9 made `shared_memory_descriptor._reinterpret` public as `reinterpret`; a
  kernel branches on it at compile time (a constexpr `if` traces only the branch taken).
"""

from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma

tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
PUBLIC_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
