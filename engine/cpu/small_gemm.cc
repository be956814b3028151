// SmallBatchGemm, written once with Google Highway: this file is compiled once per SIMD
// target (foreach_target.h re-includes it) and the best one the CPU supports runs.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/small_gemm.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// foreach_target.h first: it re-includes this file per target.
#include "hwy/highway.h"

#ifndef SUPERPOSE_ENGINE_CPU_SMALL_GEMM_SHARED_
#define SUPERPOSE_ENGINE_CPU_SMALL_GEMM_SHARED_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <utility>

#include <unistd.h>

#include "engine/cpu/small_gemm.h"

namespace superpose::engine::cpu {
namespace {

// Every dot product is 16 lane-wise partial sums ("logical lanes", lane l takes the
// products k = l mod 16) reduced by one fixed tree, on every target: a target with
// narrower vectors holds a sum in 16 / lanes registers. So the order of the float
// operations is the same on every target, and the targets with fused multiply-add
// (AVX3, AVX2, NEON) give bitwise the same results.
constexpr int kLogicalLanes = 16;

// The widest register tile (weight rows) of any target.
constexpr int kMaxTileCols = 6;

// All `rows` activation rows against `cols` weight rows at w; rows of x are `ldx` floats
// apart, rows of w `ldw`, outputs `ldy`. While it runs it prefetches next_rows weight
// rows at `next` (the next tile) into L1.
using ColumnFn = void (*)(const float* x, int32_t rows, int32_t in, int32_t ldx, const float* w,
                          int32_t ldw, float* y, int32_t ldy, const float* next, int32_t next_rows);

// One target's kernel: its register tile (tile_rows activation rows x tile_cols weight
// rows) and the column function for each count of weight rows (1..tile_cols).
struct Kernel {
  const char* target;
  int32_t tile_rows;
  int32_t tile_cols;
  ColumnFn columns[kMaxTileCols + 1];
};

// Whether the streaming GEMM prefetches the next weight tile into L1 (prefetcht0) or
// into L2 (prefetcht1); see Prefetcher. Never changes a result.
bool PrefetchIntoL1();

}  // namespace
}  // namespace superpose::engine::cpu

#endif  // SUPERPOSE_ENGINE_CPU_SMALL_GEMM_SHARED_

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using D = hn::ScalableTag<float>;
using V = hn::Vec<D>;
constexpr int kLanes = static_cast<int>(hn::MaxLanes(D()));
static_assert(kLanes <= kLogicalLanes && kLogicalLanes % kLanes == 0);
// Registers per 16-lane partial sum.
constexpr int kParts = kLogicalLanes / kLanes;

// Register tile: kParts * kR * kC accumulators + kC weight vectors + 1 input vector must
// fit the register file (32 vectors on AVX-512 and NEON, 16 on AVX2 and SSE4), or the
// accumulators spill. The tile decides which outputs are computed together, never how.
// Shapes measured on a Xeon (thread CPU time, 768 -> 2048, 512 rows): AVX2 2x3 ~59
// GFLOP/s vs 3x2 ~45, 2x2 ~52, 1x4 ~50; SSE4 1x3 ~28 vs 3x1 25, 1x2 25, 2x1 24.
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3)
constexpr int kR = 4, kC = 6;  // 24 + 6 + 1 of 32
#elif HWY_ARCH_ARM_A64 && HWY_TARGET == HWY_NEON
constexpr int kR = 2, kC = 3;  // 4 parts: 24 + 3 + 1 of 32
#elif HWY_TARGET == HWY_AVX2
// The two parts of a sum are accumulated one after the other over each chunk of `in`
// (SequentialTile), so 12 accumulators + 3 + 1 of 16 registers hold a 4x3 tile instead
// of 2x3. Thread CPU time of llama-110m's shapes on one core: 16 rows 45 -> 60 GFLOP/s,
// 64 rows 47 -> 63, 512 rows 58 -> 69; 1-2 rows unchanged (they keep PartsTile). On
// SSE4 (4 parts) the same 4x3 tile lost 10% at 2-4 rows and gained 10% from 16.
constexpr int kR = 4, kC = 3;
#define SP_SMALL_GEMM_SEQUENTIAL_PARTS 1
#else
constexpr int kR = 1, kC = 3;  // 4 parts: 12 + 3 + 1 of 16 (SSE4; the fallback spills)
#endif
static_assert(kC <= kMaxTileCols);

// Prefetches `per_step` cache lines per step of 16, from `p` up to `end`, into L1
// (prefetcht0) where the L1 data cache holds 48 KiB or more, else into L2 (prefetcht1;
// PrefetchIntoL1). While a tile runs, the activation rows of all its row groups pass
// through L1 (16 rows of 768 floats: 48 KiB); a 32 KiB L1 evicted the prefetched next
// tile before its use. GFLOP/s, 2 threads, 768 -> 128000 (393 MB, from memory), t0 -> t1:
// AMD Zen 4 (32 KiB) AVX3 8 rows 73-82 -> 128-146, 16 rows 112-130 -> 175-184; AVX2 8 rows
// 58-60 -> 104-107, 16 rows 102-104 -> 117-119. On a Xeon (48 KiB) L1 was the faster
// (gemm_bench, all shapes: AVX3 8 rows 71-80 -> 79-89, 16 rows 107-118 -> 123-136 with t0).
struct Prefetcher {
  uintptr_t p, end;
  int per_step;
  bool into_l1;

  HWY_INLINE void Step() {
    if (into_l1) {
      for (int i = 0; i < per_step; ++i, p += 64) {
        if (p < end) __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 3);
      }
    } else {
      for (int i = 0; i < per_step; ++i, p += 64) {
        if (p < end) __builtin_prefetch(reinterpret_cast<const void*>(p), 0, 2);
      }
    }
  }
};

// One step of 16 logical lanes: acc[r][c] += x[r] * w[c] lane-wise, fused where the
// target has FMA. load(p, part) reads part `part` of the 16 floats at p.
template <int R, int C, class Load>
HWY_INLINE void Step(const float* x, int32_t ldx, const float* w, int32_t ldw,
                     V (&acc)[R][C][kParts], const Load& load) {
#pragma GCC unroll 16
  for (int q = 0; q < kParts; ++q) {
    V wv[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) wv[c] = load(w + static_cast<size_t>(c) * ldw, q);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V xv = load(x + static_cast<size_t>(r) * ldx, q);
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c][q] = hn::MulAdd(xv, wv[c], acc[r][c][q]);
    }
  }
}

// The rest of one vector's lanes by the fixed tree: halves while wider than 4 lanes (lane
// i + lane i+4 of 8), then lane i + lane i+2, then i + i+1.
template <class DV>
HWY_INLINE float ReduceVector([[maybe_unused]] DV d, hn::Vec<DV> v) {
#if HWY_TARGET == HWY_SCALAR
  return hn::GetLane(v);  // one lane: the parts did the whole tree
#else
  if constexpr (hn::MaxLanes(DV()) > 4) {
    const hn::Half<DV> dh;
    return ReduceVector(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  } else {
    static_assert(hn::MaxLanes(DV()) == 4);
    const hn::Vec<DV> a = hn::Add(v, hn::ConcatUpperUpper(d, v, v));
    return hn::GetLane(hn::Add(a, hn::Shuffle2301(a)));
  }
#endif
}

// Sum of the 16 logical lanes: lane i + lane i+8, then i + i+4, i + i+2, i + i+1 (the
// first folds are across the parts where a vector has fewer than 16 lanes).
HWY_INLINE float Reduce16(const V (&parts)[kParts]) {
  V v[kParts];
  for (int q = 0; q < kParts; ++q) v[q] = parts[q];
#pragma GCC unroll 16
  for (int n = kParts / 2; n >= 1; n /= 2) {
#pragma GCC unroll 16
    for (int q = 0; q < n; ++q) v[q] = hn::Add(v[q], v[q + n]);
  }
  return ReduceVector(D(), v[0]);
}

// The tail of `in` (rem < 16 floats per row), zero-filled past rem.
template <int R, int C>
HWY_INLINE void TailStep(const float* x, int32_t ldx, const float* w, int32_t ldw, int32_t rem,
                         V (&acc)[R][C][kParts]) {
  const D d;
#if !(HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3)
  // Only AVX-512's masked loads leave the bytes past the row alone (Highway 1.0.3 emulates
  // MaskedLoad with a full load elsewhere, even on SCALAR): copy the tail first.
  HWY_ALIGN float xt[R][kLogicalLanes] = {};
  HWY_ALIGN float wt[C][kLogicalLanes] = {};
  for (int r = 0; r < R; ++r) {
    std::memcpy(xt[r], x + static_cast<size_t>(r) * ldx, sizeof(float) * rem);
  }
  for (int c = 0; c < C; ++c) {
    std::memcpy(wt[c], w + static_cast<size_t>(c) * ldw, sizeof(float) * rem);
  }
  Step<R, C>(&xt[0][0], kLogicalLanes, &wt[0][0], kLogicalLanes, acc,
             [&](const float* p, int q) { return hn::Load(d, p + q * kLanes); });
#else
  Step<R, C>(x, ldx, w, ldw, acc, [&](const float* p, int q) {
    const int32_t n = std::clamp<int32_t>(rem - q * kLanes, 0, kLanes);
    return hn::MaskedLoad(hn::FirstN(d, static_cast<size_t>(n)), d, p + q * kLanes);
  });
#endif
}

// y[r * ldy + c] = dot(x[r * ldx ...], w[c * ldw ...]) for r < R, c < C (see Step,
// Reduce16). The strides (>= in) change no result.
template <int R, int C>
HWY_INLINE void PartsTile(const float* x, int32_t ldx, const float* w, int32_t ldw, int32_t in,
                          float* y, int32_t ldy, Prefetcher& pf) {
  const D d;
  V acc[R][C][kParts];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
#pragma GCC unroll 16
      for (int q = 0; q < kParts; ++q) acc[r][c][q] = hn::Zero(d);
    }
  }
  const auto load = [&](const float* p, int q) { return hn::LoadU(d, p + q * kLanes); };
  int32_t k = 0;
  for (; k + kLogicalLanes <= in; k += kLogicalLanes) {
    pf.Step();
    Step<R, C>(x + k, ldx, w + k, ldw, acc, load);
  }
  if (k < in) TailStep<R, C>(x + k, ldx, w + k, ldw, in - k, acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) y[static_cast<size_t>(r) * ldy + c] = Reduce16(acc[r][c]);
  }
}

#ifdef SP_SMALL_GEMM_SEQUENTIAL_PARTS
// Tile with the parts of each 16-lane sum accumulated one at a time: over a chunk of
// kPartChunk floats of `in` (the tile's rows of x and w, ~7 KiB, stay in L1 between the
// parts), part 0 of every sum, then part 1, ... Each lane still adds its products in k
// order from zero, and the sums meet in Reduce16's tree: the results are bitwise those
// of Tile. Only the register tile is larger (R x C accumulators live, not R x C x parts).
constexpr int32_t kPartChunk = 256;

template <int R, int C>
HWY_INLINE void SequentialTile(const float* x, int32_t ldx, const float* w, int32_t ldw, int32_t in,
                               float* y, int32_t ldy, Prefetcher& pf) {
  const D d;
  V sums[R][C][kParts];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      for (int q = 0; q < kParts; ++q) sums[r][c][q] = hn::Zero(d);
    }
  }
  const int32_t whole = in / kLogicalLanes * kLogicalLanes;
  for (int32_t k0 = 0; k0 < whole; k0 += kPartChunk) {
    const int32_t k1 = std::min(whole, k0 + kPartChunk);
    for (int32_t k = k0; k < k1; k += kLogicalLanes) pf.Step();
    for (int q = 0; q < kParts; ++q) {
      V acc[R][C];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) acc[r][c] = sums[r][c][q];
      }
      for (int32_t k = k0 + q * kLanes; k < k1; k += kLogicalLanes) {
        V wv[C];
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) wv[c] = hn::LoadU(d, w + static_cast<size_t>(c) * ldw + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const V xv = hn::LoadU(d, x + static_cast<size_t>(r) * ldx + k);
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) acc[r][c] = hn::MulAdd(xv, wv[c], acc[r][c]);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) sums[r][c][q] = acc[r][c];
      }
    }
  }
  if (whole < in) TailStep<R, C>(x + whole, ldx, w + whole, ldw, in - whole, sums);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) y[static_cast<size_t>(r) * ldy + c] = Reduce16(sums[r][c]);
  }
}
#endif

// One register tile: y[r * ldy + c] for r < R, c < C, by this target's scheme.
template <int R, int C>
HWY_INLINE void Tile(const float* x, int32_t ldx, const float* w, int32_t ldw, int32_t in, float* y,
                     int32_t ldy, Prefetcher& pf) {
#ifdef SP_SMALL_GEMM_SEQUENTIAL_PARTS
  // A remainder tile whose parts fit the registers together keeps more FMA chains going
  // in PartsTile (one row: 6 chains on AVX2 instead of 3).
  if constexpr (R * C * kParts > 12) {
    SequentialTile<R, C>(x, ldx, w, ldw, in, y, ldy, pf);
    return;
  }
#endif
  PartsTile<R, C>(x, ldx, w, ldw, in, y, ldy, pf);
}

// The last rows % kR activation rows (Tile<R, C> with R = rem).
template <int C, int R = kR - 1>
HWY_INLINE void RemainderTile(int32_t rem, const float* x, int32_t ldx, const float* w, int32_t ldw,
                              int32_t in, float* y, int32_t ldy, Prefetcher& pf) {
  if constexpr (R >= 1) {
    if (rem == R) {
      Tile<R, C>(x, ldx, w, ldw, in, y, ldy, pf);
    } else {
      RemainderTile<C, R - 1>(rem, x, ldx, w, ldw, in, y, ldy, pf);
    }
  }
}

// A ColumnFn: all `rows` activation rows against the C weight rows at w, kR rows at a
// time, so the C weight rows are read from memory once and stay in cache for the later
// row groups; the prefetch of the next tile is spread over this one's steps.
template <int C>
void Column(const float* x, int32_t rows, int32_t in, int32_t ldx, const float* w, int32_t ldw,
            float* y, int32_t ldy, const float* next, int32_t next_rows) {
  const int32_t groups = (rows + kR - 1) / kR;
  const int64_t lines = (static_cast<int64_t>(next_rows) * ldw + 15) / 16;
  const int64_t steps = std::max<int64_t>(1, static_cast<int64_t>(groups) * (in / 16));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(next);
  Prefetcher pf{begin, begin + static_cast<uintptr_t>(next_rows) * ldw * sizeof(float),
                static_cast<int>((lines + steps - 1) / steps), PrefetchIntoL1()};
  int32_t t = 0;
  for (; t + kR <= rows; t += kR) {
    Tile<kR, C>(x + static_cast<size_t>(t) * ldx, ldx, w, ldw, in, y + static_cast<size_t>(t) * ldy,
                ldy, pf);
  }
  RemainderTile<C>(rows - t, x + static_cast<size_t>(t) * ldx, ldx, w, ldw, in,
                   y + static_cast<size_t>(t) * ldy, ldy, pf);
}

template <size_t... I>
Kernel MakeKernel(std::index_sequence<I...>) {
  return Kernel{
      hwy::TargetName(HWY_TARGET), kR, kC, {nullptr, &Column<static_cast<int>(I) + 1>...}};
}

const Kernel* GetKernel() {
  static const Kernel kernel = MakeKernel(std::make_index_sequence<kC>());
  return &kernel;
}

}  // namespace HWY_NAMESPACE
}  // namespace
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();
#undef SP_SMALL_GEMM_SEQUENTIAL_PARTS  // per target

#if HWY_ONCE
namespace superpose::engine::cpu {
namespace {

HWY_EXPORT(GetKernel);

bool PrefetchIntoL1() {
  static const bool l1 = [] {
    const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    return l1d <= 0 || l1d >= (48 << 10);  // unknown: L1, as measured on Intel first
  }();
  return l1;
}

// Run on threads only when the call has enough work to pay for waking them.
constexpr int64_t kParallelMinWork = 16384;

// Steps of more rows than this run blocked (BlockedGemm).
constexpr int32_t kStreamingMaxRows = 64;

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

// Steps of at least this many rows copy their activations to aligned rows first.
constexpr int32_t kAlignMinRows = 8;

// Every row against each weight tile as it streams in: weights are read once. From
// kAlignMinRows rows the activations are first copied to 64-byte aligned rows (when
// they are not): loads that split cache lines made 8-64 rows 10-30% slower, and the copy
// is small next to the weights.
void StreamingGemm(const Kernel& k, const float* x, int32_t rows, int32_t in, const float* w,
                   int32_t out, float* y) {
  const int32_t kc = k.tile_cols;
  const int32_t tiles = (out + kc - 1) / kc;
  const bool parallel = static_cast<int64_t>(out) * in > kParallelMinWork;
  int32_t ldx = in;
  if (rows >= kAlignMinRows && (reinterpret_cast<uintptr_t>(x) % 64 != 0 || in % 16 != 0)) {
    ldx = (in + 15) / 16 * 16;
    thread_local AlignedBuffer x_buf;
    float* xp = x_buf.Get(static_cast<size_t>(rows) * ldx);
    PackRows(x, 0, rows, in, ldx, xp);
    x = xp;
  }
#pragma omp parallel for schedule(static) if (parallel)
  for (int32_t i = 0; i < tiles; ++i) {
    const int32_t o = i * kc;
    const int32_t next = std::min(out, o + kc);
    k.columns[std::min(kc, out - o)](x, rows, in, ldx, w + static_cast<size_t>(o) * in, in, y + o,
                                     out, w + static_cast<size_t>(next) * in,
                                     std::min(kc, out - next));
  }
}

// The bytes of weight rows a thread keeps in L2 while its row blocks pass: a quarter of
// the core's L2 (the row block and the next chunk's prefetch share it), within [128 KiB,
// 512 KiB]: 512 KiB on Intel server cores (1-2 MiB of L2), 128 KiB on AMD Zen 2/3 and
// Graviton 2 (512 KiB, or 1 MiB shared). Never changes a result (see BlockedGemm).
int64_t WeightChunkBytes() {
  static const int64_t bytes = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return std::clamp<int64_t>(l2 > 0 ? l2 / 4 : (512 << 10), 128 << 10, 512 << 10);
  }();
  return bytes;
}

// Prefill-sized steps: the work is cut into (weight chunk, row block) items, a chunk of
// weight rows (WeightChunkBytes) staying in L2 while a thread runs its row blocks (~128 KiB of
// activations each) past it tile by tile. Activations and the chunk are first copied to
// 64-byte aligned rows (unaligned loads split cache lines: a third slower). The same
// tiles compute every output, so neither blocking nor copies change a result.
void BlockedGemm(const Kernel& k, const float* x, int32_t rows, int32_t in, const float* w,
                 int32_t out, float* y) {
  const int32_t kr = k.tile_rows, kc = k.tile_cols;
  const int32_t tiles = (out + kc - 1) / kc;
  const bool parallel = static_cast<int64_t>(out) * in > kParallelMinWork;
  const int32_t ld = (in + 15) / 16 * 16;
  const int64_t row_bytes = static_cast<int64_t>(ld) * sizeof(float);
  const int32_t block_rows =
      static_cast<int32_t>(std::clamp<int64_t>((128 << 10) / row_bytes / kr * kr, kr, 256));
  const int32_t chunk_tiles =
      static_cast<int32_t>(std::clamp<int64_t>(WeightChunkBytes() / row_bytes / kc, 1, tiles));
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
    float* wp = w_buf.Get(static_cast<size_t>(chunk_tiles) * kc * ld);
    int32_t packed = -1;  // the chunk in wp
#pragma omp for collapse(2) schedule(static)
    for (int32_t c = 0; c < chunks; ++c) {
      for (int32_t b = 0; b < blocks; ++b) {
        const int32_t o0 = c * chunk_tiles * kc, o1 = std::min(out, o0 + chunk_tiles * kc);
        if (packed != c) {
          PackRows(w, o0, o1, in, ld, wp);
          packed = c;
        }
        const int32_t t0 = b * block_rows, nr = std::min(block_rows, rows - t0);
        const float* xb = xp + static_cast<size_t>(t0) * ld;
        float* yb = y + static_cast<size_t>(t0) * out;
        for (int32_t o = o0; o < o1; o += kc) {
          k.columns[std::min(kc, o1 - o)](xb, nr, in, ld, wp + static_cast<size_t>(o - o0) * ld, ld,
                                          yb + o, out, nullptr, 0);
        }
      }
    }
  }
}

}  // namespace

void SmallBatchGemm(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                    float* y) {
  if (rows <= 0 || out <= 0) return;
  const Kernel& k = *HWY_DYNAMIC_DISPATCH(GetKernel)();
  if (rows <= kStreamingMaxRows) {
    StreamingGemm(k, x, rows, in, w, out, y);
  } else {
    BlockedGemm(k, x, rows, in, w, out, y);
  }
}

void SmallGemmPanel(const float* x, int32_t rows, int32_t ldx, const float* w, int32_t cols,
                    int32_t ldw, int32_t in, float* y, int32_t ldy) {
  if (rows <= 0 || cols <= 0) return;
  const Kernel& k = *HWY_DYNAMIC_DISPATCH(GetKernel)();
  for (int32_t o = 0; o < cols; o += k.tile_cols) {
    k.columns[std::min(k.tile_cols, cols - o)](x, rows, in, ldx, w + static_cast<size_t>(o) * ldw,
                                               ldw, y + o, ldy, nullptr, 0);
  }
}

const char* SmallGemmKernelName() { return HWY_DYNAMIC_DISPATCH(GetKernel)()->target; }

}  // namespace superpose::engine::cpu
#endif  // HWY_ONCE
