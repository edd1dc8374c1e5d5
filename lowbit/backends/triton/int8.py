"""INT8 family, Triton kernels (placeholder until the kernels land)."""

KERNELS = {}
