// Element-wise ops of the CPU backend (elementwise.h), once per SIMD target: this file is
// included once per target by hwy/foreach_target.h. Each op walks its row in full
// vectors, then 4-lane and 1-lane ones, with the same operations on every element.
#include "engine/cpu/elementwise.h"

#include <cmath>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/elementwise.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using D4 = hn::CappedTag<float, 4>;
using D1 = hn::CappedTag<float, 1>;

// Adds the squares of x[i, ...) in whole vectors of d to *ss; returns the first index left.
template <class D>
HWY_INLINE int32_t SumSquares(D d, const float* x, int32_t i, int32_t n, float* ss) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  hn::Vec<D> a0 = hn::Zero(d), a1 = hn::Zero(d);  // two chains: latency
  for (; i + 2 * N <= n; i += 2 * N) {
    const hn::Vec<D> v0 = hn::LoadU(d, x + i), v1 = hn::LoadU(d, x + i + N);
    a0 = hn::MulAdd(v0, v0, a0);
    a1 = hn::MulAdd(v1, v1, a1);
  }
  for (; i + N <= n; i += N) {
    const hn::Vec<D> v = hn::LoadU(d, x + i);
    a0 = hn::MulAdd(v, v, a0);
  }
  *ss += hn::GetLane(hn::SumOfLanes(d, hn::Add(a0, a1)));
  return i;
}

template <class D>
HWY_INLINE int32_t ScaleRow(D d, const float* x, const float* w, float inv, int32_t i, int32_t n,
                            float* y) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const hn::Vec<D> s = hn::Set(d, inv);
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), s), hn::LoadU(d, w + i)), d, y + i);
  }
  return i;
}

void RmsNormImpl(const float* x, const float* w, int32_t n, float eps, float* y) {
  float ss = 0.0f;
  int32_t i = SumSquares(DF(), x, 0, n, &ss);
  i = SumSquares(D4(), x, i, n, &ss);
  SumSquares(D1(), x, i, n, &ss);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  i = ScaleRow(DF(), x, w, inv, 0, n, y);
  i = ScaleRow(D4(), x, w, inv, i, n, y);
  ScaleRow(D1(), x, w, inv, i, n, y);
}

template <class D>
HWY_INLINE int32_t RopeSpan(D d, float* x, const float* cos, const float* sin, int32_t i,
                            int32_t half) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  for (; i + N <= half; i += N) {
    const hn::Vec<D> a = hn::LoadU(d, x + i), b = hn::LoadU(d, x + half + i);
    const hn::Vec<D> c = hn::LoadU(d, cos + i), s = hn::LoadU(d, sin + i);
    hn::StoreU(hn::MulSub(a, c, hn::Mul(b, s)), d, x + i);
    hn::StoreU(hn::MulAdd(b, c, hn::Mul(a, s)), d, x + half + i);
  }
  return i;
}

void RopeImpl(float* x, const float* cos, const float* sin, int32_t dim) {
  const int32_t half = dim / 2;
  int32_t i = RopeSpan(DF(), x, cos, sin, 0, half);
  i = RopeSpan(D4(), x, cos, sin, i, half);
  RopeSpan(D1(), x, cos, sin, i, half);
}

template <class D>
HWY_INLINE int32_t SwiGluSpan(D d, const float* g, const float* u, int32_t i, int32_t n, float* a) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const hn::Vec<D> one = hn::Set(d, 1.0f);
  // hn::Exp is valid up to 104; exp(-g) is +inf from 88.7 on either way.
  const hn::Vec<D> cap = hn::Set(d, 100.0f);
  for (; i + N <= n; i += N) {
    const hn::Vec<D> gv = hn::LoadU(d, g + i);
    const hn::Vec<D> e = hn::Exp(d, hn::Min(hn::Neg(gv), cap));
    hn::StoreU(hn::Mul(hn::Div(gv, hn::Add(one, e)), hn::LoadU(d, u + i)), d, a + i);
  }
  return i;
}

void SwiGluImpl(const float* g, const float* u, int32_t n, float* a) {
  int32_t i = SwiGluSpan(DF(), g, u, 0, n, a);
  i = SwiGluSpan(D4(), g, u, i, n, a);
  SwiGluSpan(D1(), g, u, i, n, a);
}

}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine::cpu {

HWY_EXPORT(RmsNormImpl);
HWY_EXPORT(RopeImpl);
HWY_EXPORT(SwiGluImpl);

void RmsNorm(const float* x, const float* w, int32_t n, float eps, float* y) {
  HWY_DYNAMIC_DISPATCH(RmsNormImpl)(x, w, n, eps, y);
}

void Rope(float* x, const float* cos, const float* sin, int32_t dim) {
  HWY_DYNAMIC_DISPATCH(RopeImpl)(x, cos, sin, dim);
}

void SwiGlu(const float* g, const float* u, int32_t n, float* a) {
  HWY_DYNAMIC_DISPATCH(SwiGluImpl)(g, u, n, a);
}

}  // namespace superpose::engine::cpu
#endif  // HWY_ONCE
