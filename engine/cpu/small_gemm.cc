#include "engine/cpu/small_gemm.h"

// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own undefined vectors.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace superpose::engine::cpu {
namespace {

// Register tile of the AVX-512 kernel: kR activation rows x kC weight rows, one zmm
// accumulator each (24 of the 32 registers; the other 8 hold weight and input vectors).
constexpr int kR = 4;
constexpr int kC = 6;

// Run on threads only when the call has enough work to pay for waking them.
constexpr int64_t kParallelMinWork = 16384;

// ---- Portable kernel ----

// Dot products of one weight row with R input rows. The summation order is spelled out
// (16 lane-wise partial sums, then a fixed tree) so that a row's result is the same
// whatever R it is computed with.
template <int R>
inline void DotRows(const float* wr, const float* const* xs, int32_t in, float* out) {
  constexpr int kLanes = 16;
  float lanes[R][kLanes] = {};
  int32_t k = 0;
  for (; k + kLanes <= in; k += kLanes) {
    for (int r = 0; r < R; ++r) {
      const float* xr = xs[r] + k;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lanes[r][l] += wr[k + l] * xr[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int32_t kk = k; kk < in; ++kk) lanes[r][kk - k] += wr[kk] * xs[r][kk];
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) lanes[r][l] += lanes[r][l + width];
    }
    out[r] = lanes[r][0];
  }
}

// Rows per block of the portable kernel: a block's activations stay in cache while
// every weight row passes them.
constexpr int32_t kPortableRowBlock = 64;

__attribute__((target_clones("avx2", "default"))) void PortableGemm(const float* x, int32_t rows,
                                                                    int32_t in, const float* w,
                                                                    int32_t out, float* y) {
  const bool parallel = static_cast<int64_t>(out) * in > kParallelMinWork;
  for (int32_t t0 = 0; t0 < rows; t0 += kPortableRowBlock) {
    const int32_t t1 = std::min(rows, t0 + kPortableRowBlock);
#pragma omp parallel for schedule(static) if (parallel)
    for (int32_t o = 0; o < out; ++o) {
      const float* wr = w + static_cast<size_t>(o) * in;
      float acc[4];
      int32_t t = t0;
      for (; t + 4 <= t1; t += 4) {
        const float* xs[4];
        for (int j = 0; j < 4; ++j) xs[j] = x + static_cast<size_t>(t + j) * in;
        DotRows<4>(wr, xs, in, acc);
        for (int j = 0; j < 4; ++j) y[static_cast<size_t>(t + j) * out + o] = acc[j];
      }
      for (; t < t1; ++t) {
        const float* xs[1] = {x + static_cast<size_t>(t) * in};
        DotRows<1>(wr, xs, in, acc);
        y[static_cast<size_t>(t) * out + o] = acc[0];
      }
    }
  }
}

// ---- AVX-512 kernel ----

#define SP_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))

// Sum of the 16 lanes by a fixed tree: lane i + lane i+8, then i + i+4, i + i+2, i + i+1.
SP_AVX512 inline float Reduce16(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// y[r * ldy + c] = dot(x[r * in ...], w[c * in ...]) for r < R, c < C. Every output is
// the same computation whatever R and C are: lane l accumulates the products k = l mod 16
// in increasing k with fused multiply-adds (the tail of `in` is masked, zero-filled),
// then Reduce16.
//
// Rows of x and w are `ld` floats apart (ld >= in): the stride changes no result.
//
// While it runs it prefetches `pf_per_iter` cache lines per step of 16 into L2, from pf
// up to pf_end (the next tile's weights), so that DRAM keeps streaming while the tile
// computes from cache.
template <int R, int C>
SP_AVX512 inline void Tile(const float* x, const float* w, int32_t in, int32_t ld, float* y,
                           int32_t ldy, const char*& pf, const char* pf_end, int pf_per_iter) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  int32_t k = 0;
  for (; k + 16 <= in; k += 16) {
    for (int i = 0; i < pf_per_iter; ++i) {
      if (pf < pf_end) _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    }
    __m512 wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_ps(w + static_cast<size_t>(c) * ld + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + static_cast<size_t>(r) * ld + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  if (k < in) {
    const __mmask16 m = static_cast<__mmask16>((1u << (in - k)) - 1);
    __m512 wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      wv[c] = _mm512_maskz_loadu_ps(m, w + static_cast<size_t>(c) * ld + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + static_cast<size_t>(r) * ld + k);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) y[static_cast<size_t>(r) * ldy + c] = Reduce16(acc[r][c]);
  }
}

// All `rows` activation rows against the C weight rows at w, kR rows at a time: the C
// weight rows are read from memory once and stay in cache for the later row groups.
// Rows of x and w are `ld` floats apart.
template <int C>
SP_AVX512 void Column(const float* x, int32_t rows, int32_t in, int32_t ld, const float* w,
                      float* y, int32_t ldy, const float* next, int32_t next_rows) {
  // Prefetch the next tile (next_rows weight rows at `next`) spread over this one's steps.
  const char* pf = reinterpret_cast<const char*>(next);
  const char* pf_end = pf + static_cast<size_t>(next_rows) * ld * sizeof(float);
  const int32_t groups = (rows + kR - 1) / kR;
  const int64_t lines = (static_cast<int64_t>(next_rows) * ld + 15) / 16;
  const int64_t steps = std::max<int64_t>(1, static_cast<int64_t>(groups) * (in / 16));
  const int pf_per_iter = static_cast<int>((lines + steps - 1) / steps);
  int32_t t = 0;
  for (; t + kR <= rows; t += kR) {
    Tile<kR, C>(x + static_cast<size_t>(t) * ld, w, in, ld, y + static_cast<size_t>(t) * ldy, ldy,
                pf, pf_end, pf_per_iter);
  }
  const float* xt = x + static_cast<size_t>(t) * ld;
  float* yt = y + static_cast<size_t>(t) * ldy;
  switch (rows - t) {
    case 0:
      break;
    case 1:
      Tile<1, C>(xt, w, in, ld, yt, ldy, pf, pf_end, pf_per_iter);
      break;
    case 2:
      Tile<2, C>(xt, w, in, ld, yt, ldy, pf, pf_end, pf_per_iter);
      break;
    case 3:
      Tile<3, C>(xt, w, in, ld, yt, ldy, pf, pf_end, pf_per_iter);
      break;
  }
}

using ColumnFn = void (*)(const float*, int32_t, int32_t, int32_t, const float*, float*, int32_t,
                          const float*, int32_t);

template <int... Cs>
constexpr ColumnFn kColumns[] = {nullptr, &Column<Cs>...};

// A 64-byte aligned float buffer that only grows (kept per thread across calls).
class AlignedBuffer {
 public:
  float* Get(size_t n) {
    if (n > size_) {
      data_.reset(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64)));
      if (!data_) throw std::bad_alloc();
      size_ = n;
    }
    return data_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data_;
  size_t size_ = 0;
};

// Copies rows [r0, r1) of src (`in` floats each) to dst, `ld` floats apart.
void PackRows(const float* src, int32_t r0, int32_t r1, int32_t in, int32_t ld, float* dst) {
  for (int32_t r = r0; r < r1; ++r) {
    std::memcpy(dst + static_cast<size_t>(r - r0) * ld, src + static_cast<size_t>(r) * in,
                sizeof(float) * in);
  }
}

// Steps of more rows than this run blocked (below).
constexpr int32_t kStreamingMaxRows = 64;

void Avx512Gemm(const float* x, int32_t rows, int32_t in, const float* w, int32_t out, float* y) {
  constexpr const ColumnFn* columns = kColumns<1, 2, 3, 4, 5, 6>;
  static_assert(kC == 6 && kR == 4);
  const int32_t tiles = (out + kC - 1) / kC;
  const bool parallel = static_cast<int64_t>(out) * in > kParallelMinWork;
  if (rows <= kStreamingMaxRows) {
    // Every row against each weight tile as it streams in: weights read once.
#pragma omp parallel for schedule(static) if (parallel)
    for (int32_t i = 0; i < tiles; ++i) {
      const int32_t o = i * kC;
      const int32_t next = std::min(out, o + kC);
      columns[std::min(kC, out - o)](x, rows, in, in, w + static_cast<size_t>(o) * in, y + o, out,
                                     w + static_cast<size_t>(next) * in, std::min(kC, out - next));
    }
    return;
  }
  // Prefill-sized steps: the work is cut into (weight chunk, row block) items, a chunk of
  // weight rows (~512 KiB) staying in L2 while a thread runs its row blocks (~128 KiB of
  // activations each) past it tile by tile. Activations and the chunk are first copied
  // to 64-byte aligned rows (unaligned loads split cache lines: a third slower). The same
  // Tile computes every output, so neither blocking nor copies change a result: a row's
  // outputs depend on that row only.
  const int32_t ld = (in + 15) / 16 * 16;
  const int64_t row_bytes = static_cast<int64_t>(ld) * sizeof(float);
  const int32_t block_rows =
      static_cast<int32_t>(std::clamp<int64_t>((128 << 10) / row_bytes / kR * kR, kR, 256));
  const int32_t chunk_tiles =
      static_cast<int32_t>(std::clamp<int64_t>((512 << 10) / row_bytes / kC, 1, tiles));
  const int32_t chunks = (tiles + chunk_tiles - 1) / chunk_tiles;
  const int32_t blocks = (rows + block_rows - 1) / block_rows;
  thread_local AlignedBuffer x_buf;
  float* xp = x_buf.Get(static_cast<size_t>(rows) * ld);
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int32_t b = 0; b < blocks; ++b) {
      PackRows(x, b * block_rows, std::min(rows, (b + 1) * block_rows), in, ld,
               xp + static_cast<size_t>(b) * block_rows * ld);
    }
    // (implicit barrier: every row is packed before any tile reads it)
    thread_local AlignedBuffer w_buf;
    float* wp = w_buf.Get(static_cast<size_t>(chunk_tiles) * kC * ld);
    int32_t packed = -1;  // the chunk in wp
#pragma omp for collapse(2) schedule(static)
    for (int32_t c = 0; c < chunks; ++c) {
      for (int32_t b = 0; b < blocks; ++b) {
        const int32_t o0 = c * chunk_tiles * kC, o1 = std::min(out, o0 + chunk_tiles * kC);
        if (packed != c) {
          PackRows(w, o0, o1, in, ld, wp);
          packed = c;
        }
        const int32_t t0 = b * block_rows, nr = std::min(block_rows, rows - t0);
        const float* xb = xp + static_cast<size_t>(t0) * ld;
        float* yb = y + static_cast<size_t>(t0) * out;
        for (int32_t o = o0; o < o1; o += kC) {
          columns[std::min(kC, o1 - o)](xb, nr, in, ld, wp + static_cast<size_t>(o - o0) * ld,
                                        yb + o, out, nullptr, 0);
        }
      }
    }
  }
}

}  // namespace

bool CpuHasAvx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

void SmallBatchGemm(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                    float* y) {
  if (rows <= 0 || out <= 0) return;
  if (CpuHasAvx512()) {
    Avx512Gemm(x, rows, in, w, out, y);
  } else {
    PortableGemm(x, rows, in, w, out, y);
  }
}

void SmallBatchGemmPortable(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                            float* y) {
  PortableGemm(x, rows, in, w, out, y);
}

const char* SmallGemmKernelName() { return CpuHasAvx512() ? "avx512" : "portable"; }

}  // namespace superpose::engine::cpu
