// The CPU backend's paged attention (attention.h), written once with Google Highway and
// compiled for every SIMD target of the architecture; Attend dispatches to the best one
// the CPU has (engine/simd.h). This file is included once per target by
// hwy/foreach_target.h.
#include "engine/cpu/attention.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/attention.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// Must come after foreach_target.h.
#include "engine/cpu/vector_registers-inl.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Keys: a run of <= 16 slots is 16 / N vectors of N <= 16 lanes, one key per lane.
using DK = hn::CappedTag<float, 16>;

// Register tiles sized by the target's vector registers (32 or 16).
constexpr int kRegs = kVectorRegisters;
// Key vectors per score tile for 1..4 queries (accumulators + key vectors + 1 broadcast
// fit the registers).
constexpr int kScoreVecs1 = 8, kScoreVecs2 = 4;
constexpr int kScoreVecs3 = kRegs == 32 ? 4 : 3, kScoreVecs4 = kRegs == 32 ? 4 : 2;
constexpr int kMaxScoreVecs = 8;
// Value tiles: kValueQueries queries x up to kValueVecs output vectors.
constexpr int kValueQueries = kRegs == 32 ? 6 : 4;
constexpr int kValueVecs = kRegs == 32 ? 4 : 2;

int32_t MaxOf(const int32_t* v, int32_t n) { return *std::max_element(v, v + n); }

// Row stride of the score buffer: room for a whole run past the last visible key, so
// full-vector stores of a run's scores stay inside the row.
size_t ScoreStride(int32_t nk_max) { return static_cast<size_t>((nk_max + 15) / 16 + 1) * 16; }

// N K or V elements as floats (bf16 widens exactly: its bits are a float's top half).
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const float* p) {
  return hn::LoadU(d, p);
}
template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const uint16_t* p) {
  const hn::Rebind<uint16_t, D> d16;
  const hn::Rebind<uint32_t, D> d32;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(d32, hn::LoadU(d16, p))));
}

// Keeps v in a register: GCC otherwise folds a loaded vector into each of its uses as a
// memory operand, loading it once per query instead of once (the tiles turn load-bound).
template <class V>
HWY_INLINE V Pin(V v) {
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
  asm("" : "+v"(v.raw));
#elif HWY_ARCH_X86 && HWY_TARGET <= HWY_SSE4
  asm("" : "+x"(v.raw));
#endif
  return v;
}

// ---------------------------------------------------------------------------------
// Scores: QB queries x KV key vectors per tile; each key's score is one fma chain over
// d in its own lane, so neither the tile shape nor the other queries change it.

// Where the next key vectors of a score pass come from and where their scores go.
template <typename T>
struct KeyCursor {
  const KvLayerView* kv;
  int32_t kvh;
  const AttnKeys* keys;
  int32_t nk_hi;  // keys past this are seen by no query of the pass
  int32_t junk;   // score position of padding vectors (past every visible key)
  T* spill;       // kMaxScoreVecs buffers of spill_len elements
  size_t spill_len;
  int32_t run = 0, vec = 0;  // next vector: vector `vec` of run `run`
};

// Copies the `have` (< N) keys at kb to sp, same strides: a full-vector load at kb could
// read past the end of the pool.
template <typename T>
void Spill(const T* kb, int32_t have, int32_t dim, int32_t bs, T* sp) {
  for (int32_t e = 0; e < dim; ++e) {
    std::memcpy(sp + static_cast<size_t>(e) * bs, kb + static_cast<size_t>(e) * bs,
                sizeof(T) * have);
  }
}

// The next KV key vectors (kp, score positions pos); false when none is left. Padding
// vectors read a spill buffer and store to the junk position.
template <class D, typename T, int KV>
HWY_INLINE bool NextKeys(D d, KeyCursor<T>* c, const T** kp, int32_t* pos) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const KvLayerView& kv = *c->kv;
  const std::vector<AttnKeys::Run>& runs = c->keys->runs;
  bool any = false;
  for (int s = 0; s < KV; ++s) {
    if (c->run >= static_cast<int32_t>(runs.size()) || runs[c->run].pos + c->vec * N >= c->nk_hi) {
      kp[s] = c->spill;
      pos[s] = c->junk;
      continue;
    }
    const AttnKeys::Run& r = runs[c->run];
    const T* kb = static_cast<const T*>(kv.k) +
                  KeyElement(r.block, r.slot0, c->kvh, 0, kv.kv_heads, kv.head_dim, kv.block_size) +
                  c->vec * N;
    const int32_t have = r.len - c->vec * N;
    pos[s] = r.pos + c->vec * N;
    kp[s] = kb;
    if (have < N) {
      T* sp = c->spill + s * c->spill_len;
      Spill(kb, have, kv.head_dim, kv.block_size, sp);
      kp[s] = sp;
    }
    any = true;
    if (have <= N) {
      ++c->run;
      c->vec = 0;
    } else {
      ++c->vec;
    }
  }
  return any;
}

template <class D, typename T, int QB, int KV>
HWY_INLINE void ScoreTile(D d, const float* const* q, const T* const* kp, const int32_t* pos,
                          int32_t dim, int32_t bs, float scale, float* const* rows) {
  using V = hn::Vec<D>;
  V acc[QB][KV];
  for (int j = 0; j < QB; ++j) {
    for (int r = 0; r < KV; ++r) acc[j][r] = hn::Zero(d);
  }
  for (int32_t e = 0; e < dim; ++e) {
    V k[KV];
    for (int r = 0; r < KV; ++r) k[r] = Pin(LoadF32(d, kp[r] + static_cast<size_t>(e) * bs));
    for (int j = 0; j < QB; ++j) {
      const V b = hn::Set(d, q[j][e]);
      for (int r = 0; r < KV; ++r) acc[j][r] = hn::MulAdd(b, k[r], acc[j][r]);
    }
  }
  const V s = hn::Set(d, scale);
  // In key order: a vector's lanes past its run are overwritten by the next run's.
  for (int j = 0; j < QB; ++j) {
    for (int r = 0; r < KV; ++r) hn::StoreU(hn::Mul(acc[j][r], s), d, rows[j] + pos[r]);
  }
}

// Scores of QB queries (rows of the score buffer) against every key one of them sees.
template <typename T, int QB, int KV>
HWY_NOINLINE void ScoreQueries(KeyCursor<T> c, const float* const* q, float scale,
                               float* const* rows) {
  const DK d;
  const T* kp[KV];
  int32_t pos[KV];
  while (NextKeys<DK, T, KV>(d, &c, kp, pos)) {
    ScoreTile<DK, T, QB, KV>(d, q, kp, pos, c.kv->head_dim, c.kv->block_size, scale, rows);
  }
}

template <typename T>
void ScoreAll(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
              const float* const* qs, const int32_t* nks, float scale, size_t stride, float* scores,
              AttnScratch* scratch) {
  const size_t spill_len = static_cast<size_t>(kv.head_dim) * kv.block_size + 16;
  scratch->spill.resize((kMaxScoreVecs * spill_len * sizeof(T) + 3) / 4);
  KeyCursor<T> c{&kv,
                 kvh,
                 &keys,
                 0,
                 static_cast<int32_t>(stride - hn::Lanes(DK())),
                 reinterpret_cast<T*>(scratch->spill.data()),
                 spill_len};
  for (int32_t j0 = 0; j0 < n; j0 += 4) {
    const int32_t qb = std::min(4, n - j0);
    c.nk_hi = MaxOf(nks + j0, qb);
    float* rows[4];
    for (int j = 0; j < qb; ++j) rows[j] = scores + (j0 + j) * stride;
    switch (qb) {
      case 1:
        ScoreQueries<T, 1, kScoreVecs1>(c, qs + j0, scale, rows);
        break;
      case 2:
        ScoreQueries<T, 2, kScoreVecs2>(c, qs + j0, scale, rows);
        break;
      case 3:
        ScoreQueries<T, 3, kScoreVecs3>(c, qs + j0, scale, rows);
        break;
      default:
        ScoreQueries<T, 4, kScoreVecs4>(c, qs + j0, scale, rows);
        break;
    }
  }
}

// ---------------------------------------------------------------------------------
// Softmax of one score row in place (keys [0, nk)); returns the sum of the exponentials,
// summed in an order fixed by nk. Whole vectors first, then one masked tail vector (lanes
// past nk are still inside the row and ignored).
float SoftmaxRow(float* sc, int32_t nk) {
  const DK d;
  using V = hn::Vec<DK>;
  const int32_t N = static_cast<int32_t>(hn::Lanes(d));
  const int32_t full = nk / N * N;
  // The maximum is exact in any order.
  const V ninf = hn::Set(d, -std::numeric_limits<float>::infinity());
  V vmx = ninf;
  for (int32_t k = 0; k < full; k += N) vmx = hn::Max(vmx, hn::LoadU(d, sc + k));
  if (full < nk) {
    vmx = hn::Max(vmx, hn::IfThenElse(hn::FirstN(d, nk - full), hn::LoadU(d, sc + full), ninf));
  }
  const V m = hn::MaxOfLanes(d, vmx);
  V total = hn::Zero(d);
  for (int32_t k = 0; k < full; k += N) {
    const V e = hn::Exp(d, hn::Sub(hn::LoadU(d, sc + k), m));
    hn::StoreU(e, d, sc + k);
    total = hn::Add(total, e);
  }
  if (full < nk) {
    const V e = hn::IfThenElseZero(hn::FirstN(d, nk - full),
                                   hn::Exp(d, hn::Sub(hn::LoadU(d, sc + full), m)));
    hn::StoreU(e, d, sc + full);
    total = hn::Add(total, e);
  }
  return hn::GetLane(hn::SumOfLanes(d, total));
}

// ---------------------------------------------------------------------------------
// Values: QN queries x NV output vectors per tile, keys in order, one fma chain per
// output element.

struct ValueRows {
  int32_t nk[kValueQueries];
  const float* p[kValueQueries];
  float inv[kValueQueries];
  float* out[kValueQueries];
  int32_t nk_lo, nk_hi;  // every query of the tile sees [0, nk_lo); none sees past nk_hi
};

template <class D, typename T, int QN, int NV, bool kCheck>
HWY_INLINE void AddValue(D d, const T* vv, int32_t k, const ValueRows& r,
                         hn::Vec<D> (&acc)[QN][NV]) {
  const size_t N = hn::Lanes(d);
  hn::Vec<D> x[NV];
  for (int v = 0; v < NV; ++v) x[v] = Pin(LoadF32(d, vv + v * N));
  for (int j = 0; j < QN; ++j) {
    if (kCheck && k >= r.nk[j]) continue;
    const hn::Vec<D> b = hn::Set(d, r.p[j][k]);
    for (int v = 0; v < NV; ++v) acc[j][v] = hn::MulAdd(b, x[v], acc[j][v]);
  }
}

template <class D, typename T, int QN, int NV>
HWY_NOINLINE void ValueTile(D d, const KvLayerView& kv, int32_t kvh, const int64_t* slots,
                            const ValueRows& r, int32_t d0) {
  const size_t N = hn::Lanes(d);
  hn::Vec<D> acc[QN][NV];
  for (int j = 0; j < QN; ++j) {
    for (int v = 0; v < NV; ++v) acc[j][v] = hn::Zero(d);
  }
  const T* vbase = static_cast<const T*>(kv.v) + static_cast<int64_t>(kvh) * kv.head_dim + d0;
  const int64_t row = static_cast<int64_t>(kv.kv_heads) * kv.head_dim;
  for (int32_t k = 0; k < r.nk_lo; ++k) {
    AddValue<D, T, QN, NV, false>(d, vbase + slots[k] * row, k, r, acc);
  }
  for (int32_t k = r.nk_lo; k < r.nk_hi; ++k) {
    AddValue<D, T, QN, NV, true>(d, vbase + slots[k] * row, k, r, acc);
  }
  for (int j = 0; j < QN; ++j) {
    const hn::Vec<D> s = hn::Set(d, r.inv[j]);
    for (int v = 0; v < NV; ++v) hn::StoreU(hn::Mul(acc[j][v], s), d, r.out[j] + d0 + v * N);
  }
}

// A value tile of the first qn <= QN queries of r.
template <class D, typename T, int NV, int QN = kValueQueries>
HWY_INLINE void ValueTileOf(D d, const KvLayerView& kv, int32_t kvh, const int64_t* slots,
                            const ValueRows& r, int32_t qn, int32_t d0) {
  if constexpr (QN > 1) {
    if (qn < QN) return ValueTileOf<D, T, NV, QN - 1>(d, kv, kvh, slots, r, qn, d0);
  }
  ValueTile<D, T, QN, NV>(d, kv, kvh, slots, r, d0);
}

// Every query's output; D: vectors whose lane count divides head_dim.
template <class D, typename T>
void ValueAll(D d, const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
              const int32_t* nks, const float* scores, size_t stride, const float* inv,
              float* const* outs) {
  const int32_t N = static_cast<int32_t>(hn::Lanes(d)), dim = kv.head_dim;
  const int64_t* slots = keys.slots.data();
  for (int32_t j0 = 0; j0 < n; j0 += kValueQueries) {
    const int32_t qn = std::min(kValueQueries, n - j0);
    ValueRows r;
    r.nk_lo = std::numeric_limits<int32_t>::max();
    r.nk_hi = 0;
    for (int32_t j = 0; j < qn; ++j) {
      const int32_t i = j0 + j;
      r.nk[j] = nks[i];
      r.inv[j] = inv[i];
      r.p[j] = scores + i * stride;
      r.out[j] = outs[i];
      r.nk_lo = std::min(r.nk_lo, nks[i]);
      r.nk_hi = std::max(r.nk_hi, nks[i]);
    }
    int32_t d0 = 0;
    for (; d0 + kValueVecs * N <= dim; d0 += kValueVecs * N) {
      ValueTileOf<D, T, kValueVecs>(d, kv, kvh, slots, r, qn, d0);
    }
    for (; d0 < dim; d0 += N) ValueTileOf<D, T, 1>(d, kv, kvh, slots, r, qn, d0);
  }
}

template <typename T>
void AttendT(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
             const float* const* qs, const int32_t* nks, float scale, float* const* outs,
             AttnScratch* scratch) {
  const size_t stride = ScoreStride(MaxOf(nks, n));
  scratch->scores.resize(stride * n);
  float* scores = scratch->scores.data();
  ScoreAll<T>(kv, kvh, keys, n, qs, nks, scale, stride, scores, scratch);
  std::vector<float>& inv = scratch->inv;
  inv.resize(n);
  for (int32_t i = 0; i < n; ++i) inv[i] = 1.0f / SoftmaxRow(scores + i * stride, nks[i]);
  // Output vectors as wide as divide head_dim.
  const DK dk;
  if (kv.head_dim % hn::Lanes(dk) == 0) {
    ValueAll<DK, T>(dk, kv, kvh, keys, n, nks, scores, stride, inv.data(), outs);
  } else if (kv.head_dim % 4 == 0) {
    ValueAll<hn::CappedTag<float, 4>, T>({}, kv, kvh, keys, n, nks, scores, stride, inv.data(),
                                         outs);
  } else {
    ValueAll<hn::CappedTag<float, 1>, T>({}, kv, kvh, keys, n, nks, scores, stride, inv.data(),
                                         outs);
  }
}

// The target this code was compiled for: what Attend dispatches to now.
const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

void AttendImpl(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
                const float* const* qs, const int32_t* nks, float scale, float* const* outs,
                AttnScratch* scratch) {
  if (n <= 0) return;
  (kv.bf16 ? AttendT<uint16_t> : AttendT<float>)(kv, kvh, keys, n, qs, nks, scale, outs, scratch);
}

}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine::cpu {

HWY_EXPORT(AttendImpl);
HWY_EXPORT(TargetNameImpl);

void AttnKeys::Append(int64_t block, int32_t slot0, int32_t len, int32_t block_size) {
  for (int32_t s = 0; s < len; ++s) slots.push_back(block * block_size + slot0 + s);
  while (len > 0) {
    if (!runs.empty()) {
      Run& last = runs.back();
      if (last.block == block && last.slot0 + last.len == slot0 && last.len < 16) {
        const int32_t take = std::min(16 - last.len, len);
        last.len += take;
        slot0 += take;
        len -= take;
        continue;
      }
    }
    const int32_t take = std::min(16, len);
    const int32_t pos = runs.empty() ? 0 : runs.back().pos + runs.back().len;
    runs.push_back({block, slot0, take, pos});
    slot0 += take;
    len -= take;
  }
}

void Attend(const KvLayerView& kv, int32_t kvh, const AttnKeys& keys, int32_t n,
            const float* const* qs, const int32_t* nks, float scale, float* const* outs,
            AttnScratch* scratch) {
  HWY_DYNAMIC_DISPATCH(AttendImpl)(kv, kvh, keys, n, qs, nks, scale, outs, scratch);
}

// Asks the dispatch itself rather than hwy::SupportedTargets(): that call (Highway 1.0.3)
// also resets the dispatch to every target the CPU has, undoing LimitTargets.
std::string AttnKernelName() { return HWY_DYNAMIC_DISPATCH(TargetNameImpl)(); }

}  // namespace superpose::engine::cpu
#endif  // HWY_ONCE
