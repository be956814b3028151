#include "engine/cpu/bf16_gemm.h"

#include <omp.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SP_X86 1
#else
#define SP_X86 0
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "engine/cpu/bf16_widen.h"
#include "engine/model/weights.h"
#include "engine/simd.h"

namespace superpose::engine::cpu {
namespace {

constexpr int32_t kR = PackedBf16::kRows;  // 32 output rows per block
constexpr int32_t kK = PackedBf16::kK;     // 32 inputs per block
constexpr int32_t kM = 16;                 // activation rows per tile
constexpr int32_t kTile = 16 * kK;         // bf16 elements of one weight tile (1 KiB)
// Below this many multiply-adds the call runs on one thread.
constexpr int64_t kParallelMinWork = 1 << 16;
// Weight bytes prefetched ahead of the tiles being multiplied.
constexpr int32_t kPrefetchBlocks = 4;

constexpr int32_t kBlockBytes = kR * kK * sizeof(uint16_t);  // 2 KiB

}  // namespace

PrefetchLines PrefetchAhead(const PackedBf16& w, int32_t rb) {
  constexpr int32_t ahead = kPrefetchBlocks;
  const char* first = reinterpret_cast<const char*>(w.block(rb, 0));
  const char* end = reinterpret_cast<const char*>(w.block(w.row_blocks(), 0));
  return PrefetchLines{
      first + static_cast<size_t>(ahead) * kBlockBytes,
      std::min(end, first + static_cast<size_t>(w.k_blocks() + ahead) * kBlockBytes),
      kBlockBytes / 64};
}

PrefetchLines PrefetchNextGroup(const PackedBf16& w, int32_t rb, int32_t kb1, int32_t group,
                                int32_t steps) {
  const int32_t kbs = w.k_blocks();
  const char* next = nullptr;
  int32_t n = 0;
  if (kb1 < kbs) {
    next = reinterpret_cast<const char*>(w.block(rb, kb1));
    n = std::min(kbs, kb1 + group) - kb1;
  } else if (rb + 1 < w.row_blocks()) {
    next = reinterpret_cast<const char*>(w.block(rb + 1, 0));
    n = std::min(kbs, group);
  }
  const int32_t lines = n * kBlockBytes / 64;
  return PrefetchLines{next, next + static_cast<size_t>(n) * kBlockBytes,
                       (lines + steps - 1) / std::max(1, steps)};
}

namespace {

#if SP_X86
// Activations as bf16, rows padded to a multiple of 16 and inputs to k_blocks * 32
// (zeros), row-major: the A tiles load straight from it.
void PackX(const float* x, int32_t rows, int32_t in, int32_t ld, int32_t row, uint16_t* dst) {
  uint16_t* d = dst + static_cast<size_t>(row) * ld;
  if (row >= rows) {
    std::fill(d, d + ld, 0);
    return;
  }
  const float* xr = x + static_cast<size_t>(row) * in;
  for (int32_t k = 0; k < in; ++k) d[k] = F32ToBf16(xr[k]);
  std::fill(d + in, d + ld, 0);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register 16 rows x 64 bytes: C tiles 0-3 (16 x 16 float), activation
// tiles 4-5 (16 rows x 32 bf16), weight tiles 6-7 (16 input pairs x 16 columns x 2 bf16).
__attribute__((target("amx-tile"))) void ConfigureTiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC does not know ldtilecfg reads all 64 bytes and drops the zeroing of the unused
  // entries (garbage there faults); force every store out first.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void ReleaseTiles() { _tile_release(); }

// Copies the valid part of a 16 x 16 float tile at (m0, n0) into y.
void StoreEdge(const float* c, int32_t m0, int32_t n0, int32_t rows, int32_t out, float* y) {
  const int32_t mm = std::min(kM, rows - m0), nn = std::min(16, out - n0);
  if (nn <= 0) return;  // the second half of the last row block can be all padding
  for (int32_t m = 0; m < mm; ++m) {
    std::memcpy(y + static_cast<size_t>(m0 + m) * out + n0, c + m * 16, nn * sizeof(float));
  }
}

// Weight row block rb (32 columns of y) times activation row tiles mb and mb+1 (`two`).
__attribute__((target("amx-tile,amx-bf16"))) void AmxBlock(const PackedBf16& w, int32_t rb,
                                                           const uint16_t* xb, int32_t ld,
                                                           int32_t mb, bool two, int32_t rows,
                                                           float* y) {
  const int32_t kbs = w.k_blocks();
  const int64_t stride = static_cast<int64_t>(ld) * sizeof(uint16_t);
  const uint16_t* x0 = xb + static_cast<size_t>(mb) * kM * ld;
  const uint16_t* x1 = x0 + static_cast<size_t>(kM) * ld;
  const char* pf = reinterpret_cast<const char*>(w.block(rb, 0)) +
                   kPrefetchBlocks * 2 * kTile * sizeof(uint16_t);
  const char* pf_end = reinterpret_cast<const char*>(w.block(rb, 0)) +
                       static_cast<size_t>(kbs) * 2 * kTile * sizeof(uint16_t);
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int32_t kb = 0; kb < kbs; ++kb) {
    const uint16_t* b = w.block(rb, kb);
    if (pf < pf_end) {
      for (int32_t l = 0; l < 2 * kTile * 2; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
      pf += 2 * kTile * sizeof(uint16_t);
    }
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kTile, 64);
    _tile_loadd(4, x0 + static_cast<size_t>(kb) * kK, stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x1 + static_cast<size_t>(kb) * kK, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int32_t n0 = rb * kR, out = w.out(), m0 = mb * kM;
  const int64_t ystride = static_cast<int64_t>(out) * sizeof(float);
  const bool full_n = n0 + kR <= out;
  alignas(64) float c[16 * 16];
  if (full_n && m0 + kM <= rows) {
    float* yt = y + static_cast<size_t>(m0) * out + n0;
    _tile_stored(0, yt, ystride);
    _tile_stored(1, yt + 16, ystride);
  } else {
    _tile_stored(0, c, 64);
    StoreEdge(c, m0, n0, rows, out, y);
    _tile_stored(1, c, 64);
    StoreEdge(c, m0, n0 + 16, rows, out, y);
  }
  if (!two) return;
  if (full_n && m0 + 2 * kM <= rows) {
    float* yt = y + static_cast<size_t>(m0 + kM) * out + n0;
    _tile_stored(2, yt, ystride);
    _tile_stored(3, yt + 16, ystride);
  } else {
    _tile_stored(2, c, 64);
    StoreEdge(c, m0 + kM, n0, rows, out, y);
    _tile_stored(3, c, 64);
    StoreEdge(c, m0 + kM, n0 + 16, rows, out, y);
  }
}

// AVX512-BF16 (no AMX: e.g. AMD Zen 4/5, Intel Cooper Lake): the same packed blocks,
// one zmm of weights = one input pair for 16 output rows; per activation row a
// broadcast pair and one vdpbf16ps. Up to kVecRows activation rows per pass.
constexpr int32_t kVecRows = 8;

// Steps of more than kVecRows rows and at most kGroupMaxRows run in weight groups, as the
// widening kernel does (bf16_widen.cc): each group of kGroupBlocks blocks (8 KiB, in L1)
// runs past every row before the next group, the sums waiting in a per-thread buffer
// between groups, while the next group is prefetched a few lines per block step. Passes
// over whole row blocks read the weights in one burst and then ran from L2 with the
// memory idle. bench/bf16_gemm_bench, AMD Zen 4 (EPYC), 2 threads, ms per 151 MB pass,
// whole-block passes -> groups: 8 rows 10.6-11.3 -> 6.9-7.1 (8 rows was a second pass
// without prefetch before), 16 rows 13.2-13.6 -> 10.1-10.3, 32 rows 19.3-19.7 -> 15.2,
// 64 rows 30.6-30.7 -> 28.4, 128 rows 53-55 -> 56; prefill (512) keeps whole passes.
constexpr int32_t kGroupBlocks = 4;
constexpr int32_t kGroupMaxRows = 128;

// What one pass covers: blocks [kb0, kb1) of the row block, its sums starting from zero
// at kb0 == 0 and from `partial` (rows of kR floats) otherwise, and going to y after the
// last block, to `partial` before it (exact float32 stores and loads: bitwise the sums of
// one pass over all blocks). While it runs, it prefetches pf into L1.
struct Span {
  int32_t kb0, kb1;
  float* partial;
  PrefetchLines pf;
};

// R activation rows (at row m0) times span s of row block rb; accumulators stay in
// registers. kPrefetch: passes that stream the weights from memory (at most kVecRows
// rows, or weight groups); prefill's passes re-read each row block from L2.
template <int R, bool kPrefetch>
__attribute__((target("avx512f,avx512bf16"))) void Avx512Bf16Rows(const PackedBf16& w, int32_t rb,
                                                                  const uint16_t* xb, int32_t ld,
                                                                  int32_t m0, __mmask16 lo,
                                                                  __mmask16 hi, Span& s, float* y) {
  const int32_t n0 = rb * kR, out = w.out();
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    if (s.kb0 == 0) {
      acc0[r] = acc1[r] = _mm512_setzero_ps();
    } else {
      const float* a = s.partial + static_cast<size_t>(m0 + r) * kR;
      acc0[r] = _mm512_loadu_ps(a);
      acc1[r] = _mm512_loadu_ps(a + 16);
    }
  }
  const uint16_t* xr = xb + static_cast<size_t>(m0) * ld;
  PrefetchLines pf = s.pf;
  for (int32_t kb = s.kb0; kb < s.kb1; ++kb) {
    const uint16_t* b = w.block(rb, kb);
    if constexpr (kPrefetch) pf.Step();
    const uint16_t* xk = xr + kb * kK;
    for (int32_t p = 0; p < kK / 2; ++p) {
      const __m512bh w0 = (__m512bh)_mm512_load_si512(b + p * 32);
      const __m512bh w1 = (__m512bh)_mm512_load_si512(b + kTile + p * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(
            *reinterpret_cast<const int32_t*>(xk + static_cast<size_t>(r) * ld + 2 * p));
        acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, w0);
        acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, w1);
      }
    }
  }
  s.pf = pf;
  for (int r = 0; r < R; ++r) {
    if (s.kb1 == w.k_blocks()) {
      float* yr = y + static_cast<size_t>(m0 + r) * out + n0;
      _mm512_mask_storeu_ps(yr, lo, acc0[r]);
      if (hi != 0) _mm512_mask_storeu_ps(yr + 16, hi, acc1[r]);
    } else {
      float* a = s.partial + static_cast<size_t>(m0 + r) * kR;
      _mm512_storeu_ps(a, acc0[r]);
      _mm512_storeu_ps(a + 16, acc1[r]);
    }
  }
}

using RowsFn = void (*)(const PackedBf16&, int32_t, const uint16_t*, int32_t, int32_t, __mmask16,
                        __mmask16, Span&, float*);
template <bool kPrefetch, int... Rs>
constexpr RowsFn kRowsFns[] = {nullptr, &Avx512Bf16Rows<Rs, kPrefetch>...};

// Every row against span s of row block rb, kVecRows rows per pass.
template <bool kPrefetch>
void Avx512Bf16Passes(const PackedBf16& w, int32_t rb, const uint16_t* xb, int32_t ld, int32_t rows,
                      __mmask16 lo, __mmask16 hi, Span& s, float* y) {
  static_assert(kVecRows == 8);
  for (int32_t m0 = 0; m0 < rows; m0 += kVecRows) {
    kRowsFns<kPrefetch, 1, 2, 3, 4, 5, 6, 7, 8>[std::min(kVecRows, rows - m0)](w, rb, xb, ld, m0,
                                                                               lo, hi, s, y);
  }
}

void Avx512Bf16Block(const PackedBf16& w, int32_t rb, const uint16_t* xb, int32_t ld, int32_t rows,
                     float* y) {
  const int32_t n0 = rb * kR, out = w.out(), kbs = w.k_blocks();
  const int32_t n_lo = std::min(16, out - n0), n_hi = std::min(16, out - n0 - 16);
  const __mmask16 lo = static_cast<__mmask16>((1u << n_lo) - 1);
  const __mmask16 hi = n_hi <= 0 ? 0 : static_cast<__mmask16>((1u << n_hi) - 1);
  if (rows <= kVecRows) {
    Span s{0, kbs, nullptr, PrefetchAhead(w, rb)};  // one pass
    Avx512Bf16Passes<true>(w, rb, xb, ld, rows, lo, hi, s, y);
    return;
  }
  if (rows > kGroupMaxRows) {  // prefill: whole-row-block passes from L2
    Span s{0, kbs, nullptr, PrefetchLines{}};
    Avx512Bf16Passes<false>(w, rb, xb, ld, rows, lo, hi, s, y);
    return;
  }
  thread_local std::vector<float> partial;
  partial.resize(static_cast<size_t>(rows) * kR);
  const int32_t passes = (rows + kVecRows - 1) / kVecRows;
  for (int32_t kb0 = 0; kb0 < kbs; kb0 += kGroupBlocks) {
    const int32_t kb1 = std::min(kbs, kb0 + kGroupBlocks);
    Span s{kb0, kb1, partial.data(),
           PrefetchNextGroup(w, rb, kb1, kGroupBlocks, passes * (kb1 - kb0))};
    Avx512Bf16Passes<true>(w, rb, xb, ld, rows, lo, hi, s, y);
  }
}

// The AMX and AVX512-BF16 kernels: activations packed as bf16.
void GemmPacked(const float* x, int32_t rows, const PackedBf16& w, float* y, bool amx,
                bool parallel) {
  const int32_t kbs = w.k_blocks(), rbs = w.row_blocks();
  const int32_t mbs = (rows + kM - 1) / kM, ld = kbs * kK;
  thread_local std::vector<uint16_t> xbuf;
  xbuf.resize(static_cast<size_t>(mbs) * kM * ld);
  uint16_t* xb = xbuf.data();
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int32_t row = 0; row < mbs * kM; ++row) PackX(x, rows, w.in(), ld, row, xb);
    // (implicit barrier: every activation row is written before any tile reads it)
    asm volatile("" ::: "memory");
    if (amx) ConfigureTiles();
#pragma omp for schedule(guided)
    for (int32_t rb = 0; rb < rbs; ++rb) {
      if (amx) {
        for (int32_t mb = 0; mb < mbs; mb += 2) AmxBlock(w, rb, xb, ld, mb, mb + 1 < mbs, rows, y);
      } else {
        Avx512Bf16Block(w, rb, xb, ld, rows, y);
      }
    }
    if (amx) ReleaseTiles();
  }
}
#endif  // SP_X86

// The widening kernel: activations rounded to bf16 but kept as float32 (rows padded with
// zeros to whole 32-input blocks), the weights widened in registers.
void GemmWiden(const float* x, int32_t rows, const PackedBf16& w, float* y, bool parallel) {
  const int32_t in = w.in(), ld = w.k_blocks() * kK, rbs = w.row_blocks();
  thread_local std::vector<float> xbuf;
  xbuf.resize(static_cast<size_t>(rows) * ld);
  float* xp = xbuf.data();
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int32_t r = 0; r < rows; ++r) {
      const float* src = x + static_cast<size_t>(r) * in;
      float* dst = xp + static_cast<size_t>(r) * ld;
      for (int32_t k = 0; k < in; ++k) dst[k] = Bf16ToF32(F32ToBf16(src[k]));
      std::fill(dst + in, dst + ld, 0.0f);
    }
#pragma omp for schedule(guided)
    for (int32_t rb = 0; rb < rbs; ++rb) Bf16WidenRowBlock(w, rb, xp, ld, rows, y);
  }
}

void Gemm(const float* x, int32_t rows, const PackedBf16& w, float* y, Bf16Kernel kernel) {
  if (rows <= 0 || w.empty()) return;
  const bool parallel =
      static_cast<int64_t>(w.out()) * w.in() * std::max(rows, 4) / 4 > kParallelMinWork;
#if SP_X86
  if (kernel != Bf16Kernel::kWiden) {
    GemmPacked(x, rows, w, y, kernel == Bf16Kernel::kAmx, parallel);
    return;
  }
#endif
  GemmWiden(x, rows, w, y, parallel);
}

}  // namespace

void PackedBf16::Free::operator()(uint16_t* p) const { std::free(p); }

void PackedBf16::Pack(const float* w, int32_t out, int32_t in) {
  out_ = out;
  in_ = in;
  const int32_t rbs = row_blocks(), kbs = k_blocks();
  size_ = static_cast<size_t>(rbs) * kbs * kR * kK;
  const size_t bytes = (size_ * sizeof(uint16_t) + 63) / 64 * 64;
  data_.reset(static_cast<uint16_t*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64))));
  if (!data_) throw std::bad_alloc();
  // Serial on purpose: Load runs on another thread than Forward, and an OpenMP pool left
  // on the loading thread halves decode speed (tests/cpu_load_threads_test.cc says why).
  for (int32_t rb = 0; rb < rbs; ++rb) {
    for (int32_t kb = 0; kb < kbs; ++kb) {
      uint16_t* blk = data_.get() + (static_cast<size_t>(rb) * kbs + kb) * kR * kK;
      for (int32_t r = 0; r < kR; ++r) {
        for (int32_t k = 0; k < kK; ++k) {
          const int32_t n = rb * kR + r, c = kb * kK + k;
          blk[Offset(r, k)] = n < out && c < in ? F32ToBf16(w[static_cast<size_t>(n) * in + c]) : 0;
        }
      }
    }
  }
}

void PackedBf16::Unpack(float* w) const {
  for (int32_t n = 0; n < out_; ++n) {
    for (int32_t c = 0; c < in_; ++c) {
      w[static_cast<size_t>(n) * in_ + c] =
          Bf16ToF32(block(n / kR, c / kK)[Offset(n % kR, c % kK)]);
    }
  }
}

bool HasAmxBf16() {
#if !SP_X86
  return false;
#else
  static const bool has = [] {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    if ((d & (1u << 22)) == 0 || (d & (1u << 24)) == 0) return false;
    // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA);
    // the permission covers every thread of the process.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
#endif
}

bool HasAvx512Bf16() {
#if !SP_X86
  return false;
#else
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
#endif
}

namespace {
// True on AMD CPUs (CPUID vendor "AuthenticAMD").
bool IsAmd() {
#if SP_X86
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "Auth" "enti" "cAMD"
  }();
  return amd;
#else
  return false;
#endif
}
}  // namespace

Bf16Kernel BestBf16Kernel() {
  // A SIMD cap below AVX-512 (engine/simd.h) turns the AVX-512 special cases off too.
  if (!simd::ActiveIsAvx512()) return Bf16Kernel::kWiden;
  if (HasAmxBf16()) return Bf16Kernel::kAmx;
  // vdpbf16ps only on AMD (Zen 4/5 run it at full rate). On Intel CPUs without AMX it
  // issues on one port: the widening kernel on AVX-512 streams as fast at one row and is
  // 1.25-1.6x faster from 16 rows on (bench/bf16_gemm_bench, docs/benchmarks.md).
  if (HasAvx512Bf16() && IsAmd()) return Bf16Kernel::kAvx512Bf16;
  return Bf16Kernel::kWiden;
}

bool Bf16KernelAvailable(Bf16Kernel kernel) {
  switch (kernel) {
    case Bf16Kernel::kAmx:
      return HasAmxBf16();
    case Bf16Kernel::kAvx512Bf16:
      return HasAvx512Bf16();
    case Bf16Kernel::kWiden:
      return true;
  }
  return false;
}

const char* Bf16KernelName(Bf16Kernel kernel) {
  switch (kernel) {
    case Bf16Kernel::kAmx:
      return "amx";
    case Bf16Kernel::kAvx512Bf16:
      return "avx512_bf16";
    case Bf16Kernel::kWiden:
      return "widen";
  }
  return "?";
}

void Bf16Gemm(const float* x, int32_t rows, const PackedBf16& w, float* y) {
  Gemm(x, rows, w, y, BestBf16Kernel());
}

void Bf16GemmWith(Bf16Kernel kernel, const float* x, int32_t rows, const PackedBf16& w, float* y) {
  Gemm(x, rows, w, y, Bf16KernelAvailable(kernel) ? kernel : Bf16Kernel::kWiden);
}

const char* Bf16GemmKernelName() { return Bf16KernelName(BestBf16Kernel()); }

}  // namespace superpose::engine::cpu
