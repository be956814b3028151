// One Highway source, compiled once per SIMD target (engine/simd.h) and dispatched at
// run time: this file includes itself through hwy/foreach_target.h.
#include "engine/row_math.h"

#ifndef SP_ENGINE_ROW_MATH_SCALAR_
#define SP_ENGINE_ROW_MATH_SCALAR_

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/row_sampling.h"

namespace superpose::engine {
namespace {

// The race skips the logs of a token that cannot win. With bar the best score so far,
// a token wins only if its noise -log(-log u), which increases with u, exceeds
// t = bar - z. kSkip[k] = exp(-exp(-(k / 2 - 1e-3))) (rounded down) is the u at which
// the noise reaches k / 2 - 1e-3: a token with t >= k / 2 and u < kSkip[k] has a noise
// below t - 1e-3 (SpLog's errors move it by less than 1e-5), so its score z + noise
// rounds below bar (|bar| < 2^10 wherever kSkip[k] exceeds the smallest uniform): it
// neither wins nor ties a token of lower id. Only a shortcut: any target may skip
// fewer tokens and draw the same token.
struct SkipTable {
  alignas(64) float u[32];
  SkipTable() {
    for (int k = 0; k < 32; ++k) {
      const double b = std::exp(-std::exp(-(k * 0.5 - 1e-3)));
      u[k] = std::nextafter(static_cast<float>(b), 0.0f);
    }
  }
};
const SkipTable kSkip;

// The uniform below which a token at z cannot beat bar (0: none, for t < 0 or NaN).
inline float SkipBound(float bar, float z) {
  const float t = (bar - z - 1e-4f) * 2.0f;  // 2 t, less a margin for its rounding
  if (!(t >= 0.0f)) return 0.0f;
  return kSkip.u[static_cast<int>(std::min(t, 31.0f))];
}

// Compressing up to 8 lanes: kCompress.packed[m] lists the lanes set in m, lowest
// first, one per nibble. A table at namespace scope: Highway's own (a local constexpr
// array) is copied to the stack on every call under GCC 12.
struct CompressTable {
  uint32_t packed[256];
  constexpr CompressTable() : packed() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int j = 0; j < 8; ++j) {
        if ((m >> j) & 1) packed[m] |= static_cast<uint32_t>(j) << (4 * k++);
      }
    }
  }
};
constexpr CompressTable kCompress;

// The race's state: the best token so far.
struct RaceState {
  int32_t best = -1;
  float score = -__builtin_inff();
};

// One token of the race in scalar form, the ids ascending (a later token must score
// strictly higher to win). The vector passes run it on their tails.
inline void ScalarRaceStep(const float* x, int32_t i, float inv_t, float mx, uint64_t key,
                           const RaceFilter& f, RaceState* st) {
  const float z = ScaledLogit(x[i], inv_t, mx);
  if (!(z >= f.z_floor)) return;
  const float u = RaceUniform(key, i);
  if (u < SkipBound(st->score, z)) return;
  const uint32_t k = RankKey(x[i]);
  if (!(k > f.cut_key || (k == f.cut_key && i <= f.cut_last))) return;
  if (f.min_p > 0.0f && !(SpExp(z) >= f.min_p)) return;
  const float score = z + -SpLog(-SpLog(u));  // z + RaceNoiseAt(key, i)
  if (score > st->score) {
    st->best = i;
    st->score = score;
  }
}

// One token of WeighRow in scalar form.
inline void ScalarWeighStep(const float* x, int32_t i, float inv_t, float mx, float min_p,
                            KeptMasses* out, double* total) {
  const float w = SpExp(ScaledLogit(x[i], inv_t, mx));
  if (!(w >= min_p)) return;
  const float m = std::floor(w * 4294967296.0f);  // FixedMass(w), exactly
  if (!(m > 0.0f)) return;
  out->ids[out->count] = i;
  out->keys[out->count] = RankKey(x[i]);
  out->mass[out->count] = m;
  ++out->count;
  *total += m;
}

}  // namespace
}  // namespace superpose::engine

#endif  // SP_ENGINE_ROW_MATH_SCALAR_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/row_math.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

const char* TargetNameT() { return hwy::TargetName(HWY_TARGET); }

#if HWY_TARGET == HWY_SCALAR
// One lane (only where the compiler's EMU128 is broken): the scalar functions.

double ScaledExpT(const float* x, int32_t n, float scale, float shift, float* out) {
  double sum = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    const float e = std::exp(x[i] * scale - shift);
    if (out != nullptr) out[i] = e;
    sum += e;
  }
  return sum;
}

float MaxOfT(const float* x, int32_t n) {
  float r = x[0];
  for (int32_t i = 1; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

int32_t FirstIndexT(const float* x, int32_t n, float v) {
  return static_cast<int32_t>(std::find(x, x + n, v) - x);
}

void SpExpRowT(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = SpExp(x[i]);
}

void SpLogRowT(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = SpLog(x[i]);
}

int32_t RaceT(const float* x, int32_t V, float inv_t, float mx, uint64_t key, const RaceFilter& f) {
  RaceState st;
  for (int32_t i = 0; i < V; ++i) ScalarRaceStep(x, i, inv_t, mx, key, f, &st);
  return st.best;
}

void WeighT(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  out->count = 0;
  double total = 0.0;
  for (int32_t i = 0; i < V; ++i) ScalarWeighStep(x, i, inv_t, mx, min_p, out, &total);
  out->total = static_cast<uint64_t>(total);
}

#else  // vector targets

using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using DU64 = hn::Repartition<uint64_t, DU>;
using DD = hn::Repartition<double, DF>;
using VF = hn::Vec<DF>;
using VI = hn::Vec<DI>;
using VU = hn::Vec<DU>;
using VU64 = hn::Vec<DU64>;
using VD = hn::Vec<DD>;
using MF = hn::Mask<DF>;

// ---- SpExp and SpLog lane by lane: the scalar functions' operations, each rounded
// once as there, so that every lane gives the scalar bits.

#ifdef HWY_DISABLE_BMI2_FMA
#error "row_math needs fused multiply-adds on AVX2 (HWY_DISABLE_BMI2_FMA is set)"
#endif

#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2) || (HWY_ARCH_ARM_A64 && HWY_TARGET == HWY_NEON)
// a * b + c rounded once: the fused instruction.
HWY_INLINE VF Fma(VF a, VF b, VF c) { return hn::MulAdd(a, b, c); }
#else
// No fused instruction (SSE4, EMU128; Highway's MulAdd rounds twice there): the product
// is exact in double, the sum is rounded to odd (to nearest, then to the odd neighbour
// when inexact), and that rounds to the float once, as a fused multiply-add would
// (53 >= 24 + 2 bits).
HWY_INLINE VD SumToOdd(VD p, VD c) {
  const DD dd;
  const hn::RebindToUnsigned<DD> du;
  const hn::RebindToSigned<DD> di;
  const VD s = hn::Add(p, c);
  const VD bb = hn::Sub(s, p);
  const VD err = hn::Add(hn::Sub(p, hn::Sub(s, bb)), hn::Sub(c, bb));  // s + err = p + c
  const auto bits = hn::BitCast(du, s);
  const auto even = hn::Eq(hn::And(bits, hn::Set(du, 1)), hn::Zero(du));
  const auto inexact = hn::And(hn::Ne(err, hn::Zero(dd)), hn::Eq(err, err));  // not inf - inf
  // One ulp away from zero when err has the sign of s, else toward zero.
  const auto toward = hn::Lt(hn::BitCast(di, hn::Xor(bits, hn::BitCast(du, err))), hn::Zero(di));
  const auto step =
      hn::IfThenElse(hn::RebindMask(du, toward), hn::Set(du, ~uint64_t{0}), hn::Set(du, 1));
  const auto adjust = hn::And(hn::RebindMask(du, inexact), even);
  return hn::BitCast(dd, hn::Add(bits, hn::IfThenElseZero(adjust, step)));
}

using DH = hn::Half<DF>;
using VH = hn::Vec<DH>;

// Half of Fma, in double.
HWY_INLINE VH FmaHalf(VH a, VH b, VH c) {
  const DD dd;
  const VD p = hn::Mul(hn::PromoteTo(dd, a), hn::PromoteTo(dd, b));
  return hn::DemoteTo(DH(), SumToOdd(p, hn::PromoteTo(dd, c)));
}

HWY_INLINE VF Fma(VF a, VF b, VF c) {
  const DH dh;
  const auto hi = FmaHalf(hn::UpperHalf(dh, a), hn::UpperHalf(dh, b), hn::UpperHalf(dh, c));
  const auto lo = FmaHalf(hn::LowerHalf(dh, a), hn::LowerHalf(dh, b), hn::LowerHalf(dh, c));
  return hn::Combine(DF(), hi, lo);
}
#endif

// Fma where the bits matter (kExact), else Highway's multiply-add (two roundings on
// SSE4 and EMU128, cheaper there).
template <bool kExact>
HWY_INLINE VF FmaOf(VF a, VF b, VF c) {
  if constexpr (kExact) return Fma(a, b, c);
  return hn::MulAdd(a, b, c);
}

HWY_INLINE VF Bits(uint32_t u) { return hn::BitCast(DF(), hn::Set(DU(), u)); }

// SpExp's reduction and polynomial: y = e^r, and t (an integer n plus 1.5 * 2^23, so
// that n is in its low bits), for z in SpExp's range.
template <bool kExact>
HWY_INLINE VF ExpCore(VF z, VF* t) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const DF d;
  *t = FmaOf<kExact>(z, hn::Set(d, kLog2E), hn::Set(d, kRound));
  const VF n = hn::Add(*t, hn::Set(d, -kRound));
  VF r = FmaOf<kExact>(n, hn::Set(d, -kLn2Hi), z);
  r = FmaOf<kExact>(n, hn::Set(d, -kLn2Lo), r);
  VF p = FmaOf<kExact>(hn::Set(d, kExpP0), r, hn::Set(d, kExpP1));
  p = FmaOf<kExact>(p, r, hn::Set(d, kExpP2));
  p = FmaOf<kExact>(p, r, hn::Set(d, kExpP3));
  p = FmaOf<kExact>(p, r, hn::Set(d, kExpP4));
  p = FmaOf<kExact>(p, r, hn::Set(d, kExpP5));
  p = FmaOf<kExact>(p, r, hn::Set(d, 1.0f));
  return FmaOf<kExact>(p, r, hn::Set(d, 1.0f));
}

// SpExp(z) per lane: its bits when kExact (and on FMA targets always); else, on SSE4
// and EMU128, with Highway's unfused multiply-adds, a few ulp off. Each lane is the
// same function of z either way.
template <bool kExact = true>
HWY_INLINE VF SpExpV(VF z) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const DF d;
  const DU du;
  const DI di;
  VF t;
  // |z| <= 87 in every lane (the usual case): 2^n is a normal float, and y * 2^n rounds
  // once, as y * 2^a * 2^b below does.
  if (HWY_LIKELY(hn::AllTrue(d, hn::Le(hn::Abs(z), hn::Set(d, 87.0f))))) {
    const VF y = ExpCore<kExact>(z, &t);
    const VU bias = hn::Set(du, 127u - kRoundBits);  // n + 127 from t's bits
    return hn::Mul(y, hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(hn::BitCast(du, t), bias))));
  }
  const MF nan = hn::IsNaN(z);
  const VF y = ExpCore<kExact>(hn::Min(hn::Max(z, hn::Set(d, kExpLo)), hn::Set(d, kExpHi)), &t);
  // 2^n as 2^a * 2^b; unsigned arithmetic on the bits (wraps on NaN lanes, which are
  // replaced below), the halving an arithmetic shift as in SpExp.
  const VU k = hn::Sub(hn::BitCast(du, t), hn::Set(du, kRoundBits));
  const VU a = hn::BitCast(du, hn::ShiftRight<1>(hn::BitCast(di, k)));
  const VU b = hn::Sub(k, a);
  const VU bias = hn::Set(du, 127);
  const VF sa = hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(a, bias)));
  const VF sb = hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(b, bias)));
  return hn::IfThenElse(nan, Bits(kNaN), hn::Mul(hn::Mul(y, sa), sb));
}

// log(1 + f) + e * ln 2 as in SpLog.
HWY_INLINE VF LogCore(VF e, VF f) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const DF d;
  const VF z = hn::Mul(f, f);
  VF q = Fma(hn::Set(d, kLogQ0), f, hn::Set(d, kLogQ1));
  q = Fma(q, f, hn::Set(d, kLogQ2));
  q = Fma(q, f, hn::Set(d, kLogQ3));
  q = Fma(q, f, hn::Set(d, kLogQ4));
  q = Fma(q, f, hn::Set(d, kLogQ5));
  q = Fma(q, f, hn::Set(d, kLogQ6));
  q = Fma(q, f, hn::Set(d, kLogQ7));
  q = Fma(q, f, hn::Set(d, kLogQ8));
  q = Fma(q, f, hn::Set(d, -0.5f));
  VF r = Fma(q, z, f);
  r = Fma(e, hn::Set(d, kLn2Lo), r);
  return Fma(e, hn::Set(d, kLn2Hi), r);
}

// SpLog(x) per lane.
HWY_INLINE VF SpLogV(VF x) {
  using namespace sp_math;  // NOLINT(build/namespaces)
  const DF d;
  const DU du;
  const DI di;
  const VU half = hn::Set(du, kSqrtHalfBits);
  const VI xi = hn::BitCast(di, x);
  // Every lane a positive normal float (the usual case): no scaling, no special values.
  if (HWY_LIKELY(hn::AllTrue(di, hn::And(hn::Gt(xi, hn::Set(di, int32_t{kMinNormalBits} - 1)),
                                         hn::Lt(xi, hn::Set(di, int32_t{kInf})))))) {
    const VU t = hn::Sub(hn::BitCast(du, x), half);
    const VF e = hn::ConvertTo(d, hn::ShiftRight<23>(hn::BitCast(di, t)));
    const VF f = hn::Add(hn::BitCast(d, hn::Add(hn::And(t, hn::Set(du, 0x007FFFFFu)), half)),
                         hn::Set(d, -1.0f));
    return LogCore(e, f);
  }
  const VF zero = hn::Zero(d), inf = Bits(kInf);
  const MF ok = hn::And(hn::Gt(x, zero), hn::Lt(x, inf));
  const MF is_zero = hn::Eq(x, zero);
  const MF is_inf = hn::Eq(x, inf);
  const MF den = hn::And(ok, hn::RebindMask(d, hn::Lt(xi, hn::Set(di, int32_t{kMinNormalBits}))));
  x = hn::IfThenElse(den, hn::Mul(x, hn::Set(d, kTwo23)), x);
  const VF e_bias = hn::IfThenElseZero(den, hn::Set(d, -23.0f));
  const VU t = hn::Sub(hn::BitCast(du, x), half);
  const VF e = hn::Add(hn::ConvertTo(d, hn::ShiftRight<23>(hn::BitCast(di, t))), e_bias);
  const VF f = hn::Add(hn::BitCast(d, hn::Add(hn::And(t, hn::Set(du, 0x007FFFFFu)), half)),
                       hn::Set(d, -1.0f));
  const VF r = LogCore(e, f);
  const VF special =
      hn::IfThenElse(is_inf, inf, hn::IfThenElse(is_zero, Bits(kMinusInf), Bits(kNaN)));
  return hn::IfThenElse(ok, r, special);
}

// Keeps v in a register as it is: a product that an add follows must not be fused
// (GCC contracts vector multiplies and adds across statements).
HWY_INLINE VF Rounded(VF v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  __asm__("" : "+v"(v.raw));
#elif HWY_ARCH_X86 && HWY_TARGET <= HWY_SSE4
  __asm__("" : "+x"(v.raw));
#elif HWY_ARCH_ARM_A64 && HWY_TARGET == HWY_NEON
  __asm__("" : "+w"(v.raw));
#else
  __asm__("" : "+m"(v));
#endif
  return v;
}

// ScaledLogit(x, inv_t, mx): the product rounded on its own.
HWY_INLINE VF Scaled(VF x, VF inv_t, VF mx) { return hn::Sub(Rounded(hn::Mul(x, inv_t)), mx); }

HWY_INLINE VU RankKeyV(VF x) {
  const DU du;
  const DI di;
  const VU u = hn::BitCast(du, hn::Add(x, hn::Zero(DF())));
  const VU sign = hn::BitCast(du, hn::ShiftRight<31>(hn::BitCast(di, u)));
  return hn::Xor(u, hn::Or(sign, hn::Set(du, 0x80000000u)));
}

// a * c mod 2^64 per lane.
HWY_INLINE VU64 MulConst(VU64 a, uint64_t c) {
  const DU64 d64;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  return hn::Mul(a, hn::Set(d64, c));  // AVX-512DQ's 64-bit multiply
#else
  // From 32 x 32 -> 64-bit products of the halves.
  const hn::Repartition<uint32_t, DU64> d32;
  const auto a_lo = hn::BitCast(d32, a);
  const auto a_hi = hn::BitCast(d32, hn::ShiftRight<32>(a));
  const auto c_lo = hn::BitCast(d32, hn::Set(d64, c & 0xFFFFFFFFu));
  const auto c_hi = hn::BitCast(d32, hn::Set(d64, c >> 32));
  const VU64 cross = hn::Add(hn::MulEven(a_hi, c_lo), hn::MulEven(a_lo, c_hi));
  return hn::Add(hn::MulEven(a_lo, c_lo), hn::ShiftLeft<32>(cross));
#endif
}

HWY_INLINE VU64 Mix64V(VU64 z) {
  z = MulConst(hn::Xor(z, hn::ShiftRight<30>(z)), 0xBF58476D1CE4E5B9ull);
  z = MulConst(hn::Xor(z, hn::ShiftRight<27>(z)), 0x94D049BB133111EBull);
  return hn::Xor(z, hn::ShiftRight<31>(z));
}

// RaceUniform of the tokens whose splitmix64 inputs are h_lo (the first half of the
// lanes) and h_hi.
HWY_INLINE VF UniformV(VU64 h_lo, VU64 h_hi) {
  const DF d;
  const DU du;
  const VU b_lo = hn::BitCast(du, hn::ShiftRight<40>(Mix64V(h_lo)));  // 24 bits, even lanes
  const VU b_hi = hn::BitCast(du, hn::ShiftRight<40>(Mix64V(h_hi)));
  const VF bits = hn::ConvertTo(d, hn::BitCast(DI(), hn::ConcatEven(du, b_hi, b_lo)));
  const VF b = hn::Min(hn::Add(bits, hn::Set(d, 0.5f)), hn::Set(d, 16777215.0f));
  return hn::Mul(b, hn::Set(d, 1.0f / 16777216.0f));
}

// RaceNoiseAt from the uniform: -log(-log u).
HWY_INLINE VF NoiseV(VF u) { return hn::Neg(SpLogV(hn::Neg(SpLogV(u)))); }

// kSkip.u[k] per lane, k the low 5 bits of `index`.
HWY_INLINE VF SkipLookup(VI index) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  // 16 lanes: one in-register permute across the table's two halves, no gather.
  const DF d;
  return VF{
      _mm512_permutex2var_ps(hn::Load(d, kSkip.u).raw, index.raw, hn::Load(d, kSkip.u + 16).raw)};
#else
  return hn::GatherIndex(DF(), kSkip.u, hn::And(index, hn::Set(DI(), 31)));
#endif
}

// SkipBound per lane, or a lower bound of it (the shortcut then skips fewer tokens).
HWY_INLINE VF SkipBoundV(VF bar, VF z) {
  const DF d;
  const VF t = hn::Mul(hn::Sub(hn::Sub(bar, z), hn::Set(d, 1e-4f)), hn::Set(d, 2.0f));
  // k = floor(t) or one less, cheaper than a conversion: for t >= 1/2, t - 1/2 + 2^23
  // rounds once to 2^23 plus an integer, in the low bits. Below 1/2 (or NaN): no bound.
  const VF k = hn::Add(hn::Min(t, hn::Set(d, 31.0f)), hn::Set(d, 8388607.5f));
  return hn::IfThenElseZero(hn::Ge(t, hn::Set(d, 0.5f)), SkipLookup(hn::BitCast(DI(), k)));
}

// The top-p cut per lane: RankKey(x) > cut_key, or equal and id <= cut_last.
HWY_INLINE MF InCut(VF x, VI id, uint32_t cut_key, int32_t cut_last) {
  const DU du;
  const DI di;
  const VU k = RankKeyV(x);
  // Unsigned > as a signed compare of both sides with the top bit flipped.
  const VU flip = hn::Set(du, 0x80000000u);
  const auto above = hn::Gt(hn::BitCast(di, hn::Xor(k, flip)),
                            hn::BitCast(di, hn::Set(du, cut_key ^ 0x80000000u)));
  const auto equal = hn::AndNot(hn::Gt(id, hn::Set(di, cut_last)),
                                hn::RebindMask(di, hn::Eq(k, hn::Set(du, cut_key))));
  return hn::RebindMask(DF(), hn::Or(above, equal));
}

// Adds v's lanes to two sums in double.
HWY_INLINE void AddWide(VF v, VD* lo, VD* hi) {
  const hn::Half<DF> dh;
  *lo = hn::Add(*lo, hn::PromoteTo(DD(), hn::LowerHalf(dh, v)));
  *hi = hn::Add(*hi, hn::PromoteTo(DD(), hn::UpperHalf(dh, v)));
}

// ---- The passes.

double ScaledExpT(const float* x, int32_t n, float scale, float shift, float* out) {
  const DF d;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const VF s = hn::Set(d, scale), nb = hn::Set(d, -shift);
  VD lo = hn::Zero(DD()), hi = lo;
  int32_t i = 0;
  for (; i + N <= n; i += N) {
    const VF e = SpExpV<false>(hn::MulAdd(hn::LoadU(d, x + i), s, nb));
    if (out != nullptr) hn::StoreU(e, d, out + i);
    AddWide(e, &lo, &hi);
  }
  if (i < n) {  // the same vector code on a padded copy: no lane depends on its position
    HWY_ALIGN float tail[HWY_LANES(float)] = {};
    std::copy(x + i, x + n, tail);
    const VF e = hn::IfThenElseZero(hn::FirstN(d, n - i),
                                    SpExpV<false>(hn::MulAdd(hn::Load(d, tail), s, nb)));
    hn::Store(e, d, tail);
    if (out != nullptr) std::copy(tail, tail + (n - i), out + i);
    AddWide(e, &lo, &hi);
  }
  return hn::GetLane(hn::SumOfLanes(DD(), hn::Add(lo, hi)));
}

float MaxOfT(const float* x, int32_t n) {
  const DF d;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  VF m0 = hn::Set(d, x[0]), m1 = m0, m2 = m0, m3 = m0;  // independent chains
  int32_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    m0 = hn::Max(m0, hn::LoadU(d, x + i));
    m1 = hn::Max(m1, hn::LoadU(d, x + i + N));
    m2 = hn::Max(m2, hn::LoadU(d, x + i + 2 * N));
    m3 = hn::Max(m3, hn::LoadU(d, x + i + 3 * N));
  }
  for (; i + N <= n; i += N) m0 = hn::Max(m0, hn::LoadU(d, x + i));
  float r = hn::GetLane(hn::MaxOfLanes(d, hn::Max(hn::Max(m0, m1), hn::Max(m2, m3))));
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

int32_t FirstIndexT(const float* x, int32_t n, float v) {
  const DF d;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const VF vv = hn::Set(d, v);
  int32_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {  // one test per four vectors
    const MF m01 = hn::Or(hn::Eq(hn::LoadU(d, x + i), vv), hn::Eq(hn::LoadU(d, x + i + N), vv));
    const MF m23 =
        hn::Or(hn::Eq(hn::LoadU(d, x + i + 2 * N), vv), hn::Eq(hn::LoadU(d, x + i + 3 * N), vv));
    if (!hn::AllFalse(d, hn::Or(m01, m23))) break;
  }
  for (; i + N <= n; i += N) {
    const intptr_t j = hn::FindFirstTrue(d, hn::Eq(hn::LoadU(d, x + i), vv));
    if (j >= 0) return i + static_cast<int32_t>(j);
  }
  for (; i < n; ++i) {
    if (x[i] == v) return i;
  }
  return n;
}

void SpExpRowT(const float* x, int64_t n, float* out) {
  const DF d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(SpExpV(hn::LoadU(d, x + i)), d, out + i);
  for (; i < n; ++i) out[i] = SpExp(x[i]);
}

void SpLogRowT(const float* x, int64_t n, float* out) {
  const DF d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(SpLogV(hn::LoadU(d, x + i)), d, out + i);
  for (; i < n; ++i) out[i] = SpLog(x[i]);
}

int32_t RaceT(const float* x, int32_t V, float inv_t, float mx, uint64_t key, const RaceFilter& f) {
  constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;
  const DF d;
  const DI di;
  const DU64 d64;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const VF s = hn::Set(d, inv_t), m = hn::Set(d, mx);
  const VF floor = hn::Set(d, f.z_floor), min_p = hn::Set(d, f.min_p);
  const bool test_min_p = f.min_p > 0.0f, cut = f.cut_key != 0 || f.cut_last != INT32_MAX;
  // The splitmix64 inputs key + (i + 1) * kGamma of the tokens in the two halves.
  VU64 h_lo = hn::Add(MulConst(hn::Iota(d64, 1), kGamma), hn::Set(d64, key));
  VU64 h_hi = hn::Add(h_lo, hn::Set(d64, static_cast<uint64_t>(N / 2) * kGamma));
  const VU64 step = hn::Set(d64, static_cast<uint64_t>(N) * kGamma);
  VI id = hn::Iota(di, 0);
  VF best = hn::Set(d, -__builtin_inff());
  VI best_id = hn::Set(di, INT32_MAX);
  float bar = -__builtin_inff();  // the best score of the lanes
  VF bar_v = hn::Set(d, bar);
  int32_t i = 0;
  for (; i + N <= V; i += N) {
    const VF xv = hn::LoadU(d, x + i);
    const VF z = Scaled(xv, s, m);
    MF live = hn::Ge(z, floor);
    VF u = hn::Zero(d);
    if (!hn::AllFalse(d, live)) {
      u = UniformV(h_lo, h_hi);
      live = hn::And(live, hn::Ge(u, SkipBoundV(bar_v, z)));
    }
    if (cut && !hn::AllFalse(d, live)) live = hn::And(live, InCut(xv, id, f.cut_key, f.cut_last));
    if (test_min_p && !hn::AllFalse(d, live)) live = hn::And(live, hn::Ge(SpExpV(z), min_p));
    if (!hn::AllFalse(d, live)) {
      const VF score = hn::Add(z, NoiseV(u));
      const MF up = hn::And(live, hn::Gt(score, best));
      if (!hn::AllFalse(d, up)) {
        best = hn::IfThenElse(up, score, best);
        best_id = hn::IfThenElse(hn::RebindMask(di, up), id, best_id);
        const float top = hn::GetLane(hn::MaxOfLanes(d, best));
        if (top > bar) {
          bar = top;
          bar_v = hn::Set(d, bar);
        }
      }
    }
    h_lo = hn::Add(h_lo, step);
    h_hi = hn::Add(h_hi, step);
    id = hn::Add(id, hn::Set(di, N));
  }
  RaceState st;
  if (bar > -__builtin_inff()) {  // the lowest id among the lanes at the top score
    const auto at_top = hn::RebindMask(di, hn::Eq(best, bar_v));
    const VI ids = hn::IfThenElse(at_top, best_id, hn::Set(di, INT32_MAX));
    st = {hn::GetLane(hn::MinOfLanes(di, ids)), bar};
  }
  for (; i < V; ++i) ScalarRaceStep(x, i, inv_t, mx, key, f, &st);
  return st.best;
}

// Appends the kept lanes (pos) of a vector of ids, keys and masses to out's arrays at
// n; returns the new count. Whole-vector stores past the count stay inside the arrays
// (n + N <= i + N <= V).
HWY_INLINE int32_t AppendKept(MF pos, VI id, VU key, VF mass, int32_t n, KeptMasses* out) {
  const DF d;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  // Compress in registers, then plain stores (a compressing store to memory is
  // microcoded and slow on AMD Zen 4).
  hn::StoreU(hn::Compress(id, hn::RebindMask(DI(), pos)), DI(), out->ids.data() + n);
  hn::StoreU(hn::Compress(key, hn::RebindMask(DU(), pos)), DU(), out->keys.data() + n);
  hn::StoreU(hn::Compress(mass, pos), d, out->mass.data() + n);
  return n + static_cast<int32_t>(hn::CountTrue(d, pos));
#else
  // Up to 8 lanes (AVX2, SSE4, NEON, EMU128): a permutation from kCompress.
  static_assert(HWY_LANES(float) <= 8, "kCompress has 8-lane entries");
  if (hn::AllTrue(d, pos)) {
    hn::StoreU(id, DI(), out->ids.data() + n);
    hn::StoreU(key, DU(), out->keys.data() + n);
    hn::StoreU(mass, d, out->mass.data() + n);
    return n + static_cast<int32_t>(hn::Lanes(d));
  }
  const DU du;
  uint8_t bits[8] = {};
  hn::StoreMaskBits(d, pos, bits);
  const VU order = hn::And(
      hn::Set(du, kCompress.packed[bits[0]]) >> hn::ShiftLeft<2>(hn::Iota(du, 0)), hn::Set(du, 7));
  const auto at = hn::IndicesFromVec(d, order);
  hn::StoreU(hn::BitCast(DI(), hn::TableLookupLanes(hn::BitCast(d, id), at)), DI(),
             out->ids.data() + n);
  hn::StoreU(hn::BitCast(du, hn::TableLookupLanes(hn::BitCast(d, key), at)), du,
             out->keys.data() + n);
  hn::StoreU(hn::TableLookupLanes(mass, at), d, out->mass.data() + n);
  n += __builtin_popcount(bits[0]);
  return n;
#endif
}

void WeighT(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  const DF d;
  const DI di;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const VF s = hn::Set(d, inv_t), m = hn::Set(d, mx), mp = hn::Set(d, min_p);
  const VF two32 = hn::Set(d, 4294967296.0f);
  VD lo = hn::Zero(DD()), hi = lo;
  VI id = hn::Iota(di, 0);
  int32_t n = 0, i = 0;
  for (; i + N <= V; i += N, id = hn::Add(id, hn::Set(di, N))) {
    const VF xv = hn::LoadU(d, x + i);
    const VF w = SpExpV(Scaled(xv, s, m));
    const VF mass = hn::Floor(hn::Mul(w, two32));
    const MF pos = hn::And(hn::Ge(w, mp), hn::Gt(mass, hn::Zero(d)));
    if (hn::AllFalse(d, pos)) continue;
    n = AppendKept(pos, id, RankKeyV(xv), mass, n, out);
    AddWide(hn::IfThenElseZero(pos, mass), &lo, &hi);
  }
  out->count = n;
  // Integers below 2^53: exact in any order.
  double total = hn::GetLane(hn::SumOfLanes(DD(), hn::Add(lo, hi)));
  for (; i < V; ++i) ScalarWeighStep(x, i, inv_t, mx, min_p, out, &total);
  out->total = static_cast<uint64_t>(total);
}

#endif  // HWY_TARGET == HWY_SCALAR

}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine {

HWY_EXPORT(TargetNameT);
HWY_EXPORT(ScaledExpT);
HWY_EXPORT(MaxOfT);
HWY_EXPORT(FirstIndexT);
HWY_EXPORT(SpExpRowT);
HWY_EXPORT(SpLogRowT);
HWY_EXPORT(RaceT);
HWY_EXPORT(WeighT);

const char* RowMathTarget() { return HWY_DYNAMIC_DISPATCH(TargetNameT)(); }

double ScaledExp(const float* x, int32_t n, float scale, float shift, float* out) {
  return HWY_DYNAMIC_DISPATCH(ScaledExpT)(x, n, scale, shift, out);
}

float MaxOf(const float* x, int32_t n) { return HWY_DYNAMIC_DISPATCH(MaxOfT)(x, n); }

int32_t FirstIndexOf(const float* x, int32_t n, float v) {
  return HWY_DYNAMIC_DISPATCH(FirstIndexT)(x, n, v);
}

void SpExpRow(const float* x, int64_t n, float* out) { HWY_DYNAMIC_DISPATCH(SpExpRowT)(x, n, out); }

void SpLogRow(const float* x, int64_t n, float* out) { HWY_DYNAMIC_DISPATCH(SpLogRowT)(x, n, out); }

int32_t RaceRow(const float* x, int32_t V, float inv_t, float mx, uint64_t key,
                const RaceFilter& filter) {
  return HWY_DYNAMIC_DISPATCH(RaceT)(x, V, inv_t, mx, key, filter);
}

void WeighRow(const float* x, int32_t V, float inv_t, float mx, float min_p, KeptMasses* out) {
  if (static_cast<int32_t>(out->ids.size()) < V) {
    out->ids.resize(V);
    out->keys.resize(V);
    out->mass.resize(V);
  }
  HWY_DYNAMIC_DISPATCH(WeighT)(x, V, inv_t, mx, min_p, out);
}

}  // namespace superpose::engine
#endif  // HWY_ONCE
