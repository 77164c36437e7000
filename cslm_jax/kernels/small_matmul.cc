// cslm_jax CPU decoding kernel: y[M, N] = x[M, K] @ W for few rows (a decoding step's batch).
//
// Why: a decoding step multiplies a handful of activation rows by every weight matrix once. The
// step is bound by reading the weights from memory, and XLA:CPU's GEMM reads them at ~11-14 GB/s
// at 8 rows on 2 cores (as if it repacked the weight matrix on every call), this kernel at ~30.
// Here the weights are stored once, at load time, in the layout the inner loop reads: panels of
// NB = 32 columns, W_p[p, k, c] = W[k, p * NB + c] (zero columns past N), so each panel is one
// contiguous stream, multiplied into up to MR rows held in registers.
//
// Threads: panels are claimed in chunks from an atomic counter by the calling thread and by
// helper tasks scheduled on XLA's intra-op thread pool. The caller never waits for a helper that
// has not started (a helper that starts after all panels are claimed does nothing), so two
// kernels blocking the pool's threads at once cannot deadlock.
//
// Built at first use by cslm_jax/cpu_kernels.py with -march=native (x86-64: AVX-512F, or AVX2 +
// FMA); registered as the XLA FFI target "cslm_small_matmul".
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t NB = 32;  // panel width (columns)

// The vector type of the build's ISA and the few operations the kernel uses.
#if defined(__AVX512F__)
// 2 zmm per row of a panel; MR rows x KU interleaved k accumulators <= 16 zmm (of 32).
constexpr int MR = 8;
using V = __m512;
constexpr int W = 16;  // floats per vector
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vset1(float a) { return _mm512_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a); }
#elif defined(__AVX2__) && defined(__FMA__)
// 4 ymm per row; <= 12 accumulators (of 16 ymm) leaves room for the weight loads.
constexpr int MR = 3;
using V = __m256;
constexpr int W = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vset1(float a) { return _mm256_set1_ps(a); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline void vstore(float* p, V a) { _mm256_storeu_ps(p, a); }
#else
#error "cslm_jax small_matmul needs AVX-512F or AVX2+FMA (-march=native on such a CPU)"
#endif
constexpr int NV = NB / W;  // vectors per panel row

// acc[r] += x[r * ldx] * w[0 : NB] for R rows: one k step of one accumulator set.
template <int R>
inline void fma_step(V (&acc)[R][NV], const float* __restrict x, int64_t ldx,
                     const float* __restrict w) {
  V wv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) wv[v] = vload(w + v * W);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const V xv = vset1(x[r * ldx]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vfma(xv, wv[v], acc[r][v]);
  }
}

// R rows of x times one panel; y rows get the panel's first ncols columns.
template <int R>
inline void panel_rows(const float* __restrict x, int64_t ldx, const float* __restrict wp,
                       int64_t k, float* __restrict y, int64_t ldy, int64_t ncols) {
  // KU accumulator sets over interleaved k keep enough independent FMA chains in flight
  // when R is small (FMA latency x throughput ~ 8 chains).
  constexpr int KU = (MR / R) > 0 ? (MR / R) : 1;
  V acc[KU][R][NV];
#pragma GCC unroll 8
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[u][r][v] = vzero();
  int64_t kk = 0;
  for (; kk + KU <= k; kk += KU) {
#pragma GCC unroll 8
    for (int u = 0; u < KU; ++u) fma_step<R>(acc[u], x + kk + u, ldx, wp + (kk + u) * NB);
  }
  for (; kk < k; ++kk) fma_step<R>(acc[0], x + kk, ldx, wp + kk * NB);
#pragma GCC unroll 8
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][r][v] = vadd(acc[0][r][v], acc[u][r][v]);
  for (int r = 0; r < R; ++r) {
    if (ncols == NB) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) vstore(y + r * ldy + v * W, acc[0][r][v]);
    } else {  // the last, partial panel
      float tmp[NB];
      for (int v = 0; v < NV; ++v) vstore(tmp + v * W, acc[0][r][v]);
      for (int64_t c = 0; c < ncols; ++c) y[r * ldy + c] = tmp[c];
    }
  }
}

void panel(const float* x, int64_t m, int64_t k, const float* wp, float* y, int64_t n, int64_t p) {
  const int64_t c0 = p * NB, ncols = std::min<int64_t>(NB, n - c0);
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    const int64_t rows = std::min<int64_t>(MR, m - r0);
    const float* xr = x + r0 * k;
    float* yr = y + r0 * n + c0;
    switch (rows) {
      case 1: panel_rows<1>(xr, k, wp, k, yr, n, ncols); break;
      case 2: panel_rows<2>(xr, k, wp, k, yr, n, ncols); break;
      case 3: panel_rows<3>(xr, k, wp, k, yr, n, ncols); break;
#if defined(__AVX512F__)
      case 4: panel_rows<4>(xr, k, wp, k, yr, n, ncols); break;
      case 5: panel_rows<5>(xr, k, wp, k, yr, n, ncols); break;
      case 6: panel_rows<6>(xr, k, wp, k, yr, n, ncols); break;
      case 7: panel_rows<7>(xr, k, wp, k, yr, n, ncols); break;
      case 8: panel_rows<8>(xr, k, wp, k, yr, n, ncols); break;
#endif
      default: break;
    }
  }
}

struct Job {
  const float* x = nullptr;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t m = 0, k = 0, n = 0, panels = 0, chunk = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
  std::atomic<bool> closed{false};

  void work() {
    for (;;) {
      const int64_t p0 = next.fetch_add(chunk);
      if (p0 >= panels) return;
      const int64_t p1 = std::min(p0 + chunk, panels);
      for (int64_t p = p0; p < p1; ++p) panel(x, m, k, w + p * k * NB, y, n, p);
    }
  }
};

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != NB || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * NB || yd[1] <= (wd[0] - 1) * NB)
    return ffi::Error::InvalidArgument(
        "cslm_small_matmul: expected x [M, K], w [ceil(N / 32), K, 32], y [M, N]");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->m = xd[0];
  job->k = xd[1];
  job->n = yd[1];
  job->panels = wd[0];
  if (job->m == 0 || job->n == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~8 chunks per thread: balance when a thread is late (busy with another op) without
  // contending on the counter.
  job->chunk = std::max<int64_t>(1, job->panels / (threads * 8));
  const int64_t chunks = (job->panels + job->chunk - 1) / job->chunk;
  const int64_t helpers = std::min<int64_t>(threads - 1, chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([job] {
      job->active.fetch_add(1);
      if (!job->closed.load()) job->work();
      job->active.fetch_sub(1);
    });
  }
  job->work();
  // Every panel is claimed; wait for the helpers that are still computing theirs.
  job->closed.store(true);
  while (job->active.load() > 0) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CslmSmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
