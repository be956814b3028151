#include "engine/cpu/bf16_widen.h"

#include <algorithm>
#include <cstring>

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

// R activation rows from m0 against row block rb.
template <int R>
HWY_NOINLINE void WidenRows(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld,
                            int32_t m0, float* y) {
  const DF df;
  const DU du;
  constexpr int32_t kTile = 16 * PackedBf16::kK;  // elements of one 16-row half
  const auto hi = hn::Set(du, 0xFFFF0000u);
  hn::Vec<DF> acc[R][kJ];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < kJ; ++j) acc[r][j] = hn::Zero(df);
  }
  const float* x0 = xp + static_cast<size_t>(m0) * ld;
  for (int32_t kb = 0; kb < w.k_blocks(); ++kb) {
    const uint16_t* b = w.block(rb, kb);
    const float* xk = x0 + kb * PackedBf16::kK;
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
  const int32_t out = w.out(), n0 = rb * PackedBf16::kRows;
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

void RowBlock(const PackedBf16& w, int32_t rb, const float* xp, int32_t ld, int32_t rows,
              float* y) {
  int32_t m = 0;
  for (; m + kR <= rows; m += kR) WidenRows<kR>(w, rb, xp, ld, m, y);
  switch (rows - m) {
    case 0:
      break;
#define SP_WIDEN_TAIL(n)                                                    \
  case n:                                                                   \
    if constexpr (kR > n) WidenRows<(kR > n ? n : 1)>(w, rb, xp, ld, m, y); \
    break;
      SP_WIDEN_TAIL(1)
      SP_WIDEN_TAIL(2)
      SP_WIDEN_TAIL(3)
      SP_WIDEN_TAIL(4)
      SP_WIDEN_TAIL(5)
#undef SP_WIDEN_TAIL
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
