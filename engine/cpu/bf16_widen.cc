#include "engine/cpu/bf16_widen.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/bf16_widen.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "engine/cpu/vector_registers-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 lanes: a vector covers part or all of one 16-row half of a block.
using DF = hn::CappedTag<float, 16>;
using DU = hn::RebindToUnsigned<DF>;
constexpr int kN = static_cast<int>(hn::MaxLanes(DF()));
constexpr int kJ = PackedBf16::kRows / kN;  // vectors per input pair of a block

// Activation rows per pass: accumulators (kJ per row) plus two broadcasts per row and two
// widened weight vectors must fit the register file (engine/cpu/vector_registers-inl.h).
constexpr int kR = std::clamp((kVectorRegisters - 2) / (kJ + 2), 1, 6);

// Steps of more rows than one register tile and at most kGroupMaxRows run in weight
// groups: each group of kGroupBlocks 32-input blocks (8 KiB, kept in L1) is run past every
// row before the next group, the partial sums waiting in acc_rows between groups, and
// while a group's passes run, the next group is prefetched a few lines per block step.
// Passes over a whole row block at a time (the other order) read the weights in one burst
// per row block, and the memory idled while the later passes ran from L2: memory and
// arithmetic times added up. bench/bf16_gemm_bench, Xeon, 2 threads, GFLOP/s, whole-block
// passes -> groups: AVX3 8 rows 73-88 -> 164-167, 16 rows 125-143 -> 240-244, 32 rows
// 167-181 -> 245, 64 rows 211-221 -> 261-264, 128 rows 238 -> 254; AVX2 8 rows 65-82 ->
// 117-119, 16 rows 86-97 -> 124-126, 32 rows 102-108 -> 125-127, 64 rows 112-116 -> 126.
// At 512 rows the groups lost (258 -> 236 on AVX3): prefill keeps whole-block passes.
constexpr int32_t kGroupBlocks = 4;
constexpr int32_t kGroupMaxRows = 128;

constexpr int32_t kBlockElems = PackedBf16::kRows * PackedBf16::kK;

// acc[r][j] += the products of R activation rows (x0, `ld` floats apart, at the first
// block's inputs) with `blocks` consecutive packed blocks from b: per output element, for
// each block, for each input pair, fma(x_even, w_even) then fma(x_odd, w_odd).
template <int R>
HWY_INLINE void AccumulateBlocks(const uint16_t* b, const float* x0, int32_t ld, int32_t blocks,
                                 hn::Vec<DF> (&acc)[R][kJ], PrefetchLines* pf) {
  const DF df;
  const DU du;
  constexpr int32_t kTile = 16 * PackedBf16::kK;  // elements of one 16-row half
  const auto hi = hn::Set(du, 0xFFFF0000u);
  for (int32_t kb = 0; kb < blocks; ++kb, b += kBlockElems) {
    const float* xk = x0 + kb * PackedBf16::kK;
    pf->Step();
    for (int32_t p = 0; p < PackedBf16::kK / 2; ++p) {
      hn::Vec<DF> xe[R], xo[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        xe[r] = hn::Set(df, xk[static_cast<size_t>(r) * ld + 2 * p]);
        xo[r] = hn::Set(df, xk[static_cast<size_t>(r) * ld + 2 * p + 1]);
      }
#pragma GCC unroll 32
      for (int j = 0; j < kJ; ++j) {
        // Lanes = output rows j*kN.. of the block; each u32 = {W[n][2p], W[n][2p+1]}.
        const int n = j * kN;
        const uint16_t* src = b + (n / 16) * kTile + (p * 16 + n % 16) * 2;
        const auto u = hn::Load(du, reinterpret_cast<const uint32_t*>(src));
        const auto we = hn::BitCast(df, hn::ShiftLeft<16>(u));
        const auto wo = hn::BitCast(df, hn::And(u, hi));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][j] = hn::MulAdd(xe[r], we, acc[r][j]);
          acc[r][j] = hn::MulAdd(xo[r], wo, acc[r][j]);
        }
      }
    }
  }
}

// The sums of R rows (from m0) into y's columns of row block rb.
template <int R>
HWY_INLINE void StoreRows(const hn::Vec<DF> (&acc)[R][kJ], int32_t out, int32_t rb, int32_t m0,
                          float* y) {
  const DF df;
  const int32_t n0 = rb * PackedBf16::kRows;
  const int32_t valid = std::min(PackedBf16::kRows, out - n0);
  for (int r = 0; r < R; ++r) {
    float* yr = y + static_cast<size_t>(m0 + r) * out + n0;
    if (valid == PackedBf16::kRows) {
      for (int j = 0; j < kJ; ++j) hn::StoreU(acc[r][j], df, yr + j * kN);
    } else {
      HWY_ALIGN float tmp[PackedBf16::kRows];
      for (int j = 0; j < kJ; ++j) hn::Store(acc[r][j], df, tmp + j * kN);
      std::memcpy(yr, tmp, sizeof(float) * valid);
    }
  }
}

// R activation rows from m0 against all of row block rb, in one pass, prefetching as pf
// says (a copy: the loop keeps it in registers).
template <int R>
HWY_NOINLINE void WidenRows(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld,
                            int32_t m0, const PrefetchLines& pf, float* y) {
  hn::Vec<DF> acc[R][kJ];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kJ; ++j) acc[r][j] = hn::Zero(DF());
  }
  PrefetchLines lpf = pf;
  AccumulateBlocks<R>(w.block(rb, 0), xp + static_cast<size_t>(m0) * ld, ld, w.k_blocks(), acc,
                      &lpf);
  StoreRows<R>(acc, w.out(), rb, m0, y);
}

// R activation rows from m0 against blocks [kb0, kb1) of row block rb. The sums start
// from zero at kb0 == 0 and from acc_rows (rows of 32 floats) otherwise, and go to y after
// the last block, back to acc_rows before it: exact float32 stores and loads, so they are
// bitwise those of WidenRows.
template <int R>
HWY_NOINLINE void WidenGroupRows(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld,
                                 int32_t m0, int32_t kb0, int32_t kb1, float* acc_rows,
                                 PrefetchLines& pf, float* y) {
  const DF df;
  constexpr int32_t kW = PackedBf16::kRows;  // floats per row of acc_rows
  hn::Vec<DF> acc[R][kJ];
  for (int r = 0; r < R; ++r) {
    float* a = acc_rows + static_cast<size_t>(m0 + r) * kW;
    for (int j = 0; j < kJ; ++j) acc[r][j] = kb0 == 0 ? hn::Zero(df) : hn::LoadU(df, a + j * kN);
  }
  PrefetchLines lpf = pf;  // a local copy: the loop keeps it in registers
  AccumulateBlocks<R>(w.block(rb, kb0), xp + static_cast<size_t>(m0) * ld + kb0 * PackedBf16::kK,
                      ld, kb1 - kb0, acc, &lpf);
  pf = lpf;
  if (kb1 == w.k_blocks()) {
    StoreRows<R>(acc, w.out(), rb, m0, y);
    return;
  }
  for (int r = 0; r < R; ++r) {
    float* a = acc_rows + static_cast<size_t>(m0 + r) * kW;
    for (int j = 0; j < kJ; ++j) hn::StoreU(acc[r][j], df, a + j * kN);
  }
}

// Every row against row block rb in whole-block passes (kb1 < 0), or against blocks
// [kb0, kb1) in group passes; kR rows at a time.
void RowsPass(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld, int32_t rows,
              int32_t kb0, int32_t kb1, float* acc_rows, PrefetchLines& pf, float* y) {
  int32_t m = 0;
  const auto run = [&](auto r) {
    constexpr int R = decltype(r)::value;
    if (kb1 < 0) {
      WidenRows<R>(w, rb, xp, ld, m, pf, y);
    } else {
      WidenGroupRows<R>(w, rb, xp, ld, m, kb0, kb1, acc_rows, pf, y);
    }
  };
  for (; m + kR <= rows; m += kR) run(std::integral_constant<int, kR>());
  switch (rows - m) {
    case 0:
      break;
#define SP_WIDEN_TAIL(n)                                                        \
  case n:                                                                       \
    if constexpr (kR > n) run(std::integral_constant<int, (kR > n ? n : 1)>()); \
    break;
      SP_WIDEN_TAIL(1)
      SP_WIDEN_TAIL(2)
      SP_WIDEN_TAIL(3)
      SP_WIDEN_TAIL(4)
      SP_WIDEN_TAIL(5)
#undef SP_WIDEN_TAIL
  }
}

void RowBlock(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld, int32_t rows,
              float* y) {
  const int32_t kbs = w.k_blocks();
  PrefetchLines pf;
  if (rows <= kR) {  // one whole-row-block pass, prefetching ahead
    pf = PrefetchAhead(w, rb);
    RowsPass(w, rb, xp, ld, rows, 0, -1, nullptr, pf, y);
    return;
  }
  if (rows > kGroupMaxRows) {  // whole-row-block passes
    RowsPass(w, rb, xp, ld, rows, 0, -1, nullptr, pf, y);
    return;
  }
  thread_local std::vector<float> acc_rows;
  acc_rows.resize(static_cast<size_t>(rows) * PackedBf16::kRows);
  const int32_t passes = (rows + kR - 1) / kR;
  for (int32_t kb0 = 0; kb0 < kbs; kb0 += kGroupBlocks) {
    const int32_t kb1 = std::min(kbs, kb0 + kGroupBlocks);
    pf = PrefetchNextGroup(w, rb, kb1, kGroupBlocks, passes * (kb1 - kb0));
    RowsPass(w, rb, xp, ld, rows, kb0, kb1, acc_rows.data(), pf, y);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine::cpu {

HWY_EXPORT(RowBlock);

void Bf16WidenRowBlock(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld, int32_t rows,
                       float* y) {
  HWY_DYNAMIC_DISPATCH(RowBlock)(w, rb, xp, ld, rows, y);
}

}  // namespace superpose::engine::cpu
#endif  // HWY_ONCE
