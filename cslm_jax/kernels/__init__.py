"""Hand-written kernels: the native CPU matmul for decoding steps (cpu_matmul + small_matmul.cc)."""
