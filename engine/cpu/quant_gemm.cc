// QuantGemm, its dequantization written once with Google Highway: this file is compiled
// once per SIMD target (foreach_target.h re-includes it) and the best one the CPU supports
// runs. The dot products are SmallBatchGemm's (SmallGemmPanel), so they are too.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/cpu/quant_gemm.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// foreach_target.h first: it re-includes this file per target.
#include "hwy/highway.h"

#ifndef SUPERPOSE_ENGINE_CPU_QUANT_GEMM_SHARED_
#define SUPERPOSE_ENGINE_CPU_QUANT_GEMM_SHARED_

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "absl/strings/str_cat.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/cpu/small_gemm.h"

namespace superpose::engine::cpu {
namespace {

// One target's dequantization: weight rows [r0, r1) of w as float32 into out, `ld`
// floats apart (only the first w.in of each row are written).
using DequantFn = void (*)(const QuantMatrix& w, int32_t r0, int32_t r1, float* out, int32_t ld);

struct DequantKernel {
  const char* target;
  DequantFn int8;
  DequantFn q4;
};

}  // namespace
}  // namespace superpose::engine::cpu

#endif  // SUPERPOSE_ENGINE_CPU_QUANT_GEMM_SHARED_

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// int8: one vector of codes widened per step (16 on AVX-512, 8 on AVX2, 4 on SSE4/NEON).
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DI8 = hn::Rebind<int8_t, DF>;

// w = float(code) * scale: int8 -> int32 -> float32 is exact, one rounding in the multiply,
// as DequantizeRows.
void DequantInt8(const QuantMatrix& w, int32_t r0, int32_t r1, float* out, int32_t ld) {
  const DF df;
  const DI di;
  const DI8 d8;
  const int32_t n = static_cast<int32_t>(hn::Lanes(df)), in = w.in;
  for (int32_t r = r0; r < r1; ++r) {
    const int8_t* src = reinterpret_cast<const int8_t*>(&w.codes[static_cast<size_t>(r) * in]);
    float* dst = out + static_cast<size_t>(r - r0) * ld;
    const float scale = w.scales[r];
    const auto vs = hn::Set(df, scale);
    int32_t c = 0;
    for (; c + n <= in; c += n) {
      const auto q = hn::ConvertTo(df, hn::PromoteTo(di, hn::LoadU(d8, src + c)));
      hn::StoreU(hn::Mul(q, vs), df, dst + c);
    }
    for (; c < in; ++c) dst[c] = static_cast<float>(src[c]) * scale;
  }
}

// q4: a group's 16-entry table is 16 / kN vectors; a lane's weight is a table-lane
// permute (TableLookupLanes: vpermps on AVX2 / AVX-512, tbl on NEON) of the vector that
// holds its index, the vectors merged by index range. A pure selection: exact.
using D = hn::ScalableTag<float>;
using DIF = hn::RebindToSigned<D>;
constexpr int kN = static_cast<int>(hn::MaxLanes(D()));
constexpr int kTables = (16 + kN - 1) / kN;
constexpr int kShift = kN >= 16 ? 4 : kN == 8 ? 3 : 2;

#if HWY_TARGET == HWY_SCALAR
// The one-lane fallback target: scalar.
HWY_INLINE void DequantGroup(const uint8_t* bytes, const float* table, float* dst) {
  for (int32_t c = 0; c < 16; ++c) {
    const uint8_t b = bytes[c % 8];
    dst[c] = table[c >= 8 ? b >> 4 : b & 15];
  }
}
#else
// The indices of columns [p * kN, (p + 1) * kN) of a group (byte j: column j in the low
// nibble, column j + 8 in the high one).
HWY_INLINE hn::Vec<DIF> GroupIndices(const uint8_t* bytes, int p) {
  const DIF di;
  if constexpr (kN >= 16) {
    const hn::Half<DIF> dh;
    const hn::Rebind<uint8_t, decltype(dh)> d8;
    const auto b = hn::PromoteTo(dh, hn::LoadU(d8, bytes));
    return hn::Combine(di, hn::ShiftRight<4>(b), hn::And(b, hn::Set(dh, 15)));
  } else {
    const hn::Rebind<uint8_t, DIF> d8;
    const auto b = hn::PromoteTo(di, hn::LoadU(d8, bytes + (p * kN) % 8));
    return p * kN >= 8 ? hn::ShiftRight<4>(b) : hn::And(b, hn::Set(di, 15));
  }
}

// One q4 group (16 columns) of a row into dst.
HWY_INLINE void DequantGroup(const uint8_t* bytes, const float* table, float* dst) {
  const D d;
  const DIF di;
  hn::Vec<D> t[kTables];
  for (int j = 0; j < kTables; ++j) t[j] = hn::LoadU(d, table + j * kN);
  for (int p = 0; p < 16 / kN; ++p) {
    const auto idx = GroupIndices(bytes, p);
    const auto lane = hn::IndicesFromVec(d, hn::And(idx, hn::Set(di, kN - 1)));
    auto v = hn::TableLookupLanes(t[0], lane);
    const auto which = hn::ShiftRight<kShift>(idx);
    for (int j = 1; j < kTables; ++j) {
      const auto m = hn::RebindMask(d, hn::Eq(which, hn::Set(di, j)));
      v = hn::IfThenElse(m, hn::TableLookupLanes(t[j], lane), v);
    }
    hn::StoreU(v, d, dst + p * kN);
  }
}
#endif  // HWY_TARGET == HWY_SCALAR

void DequantQ4(const QuantMatrix& w, int32_t r0, int32_t r1, float* out, int32_t ld) {
  const int32_t in = w.in, groups = static_cast<int32_t>(Q4Groups(in));
  const int64_t rb = w.row_bytes();
  const int32_t full = in / kQ4GroupSize;
  for (int32_t r = r0; r < r1; ++r) {
    const uint8_t* src = &w.codes[static_cast<size_t>(r * rb)];
    const float* tables = &w.lut[static_cast<size_t>(w.lut_set[r]) * groups * kQ4Levels];
    float* dst = out + static_cast<size_t>(r - r0) * ld;
    for (int32_t g = 0; g < full; ++g) {
      DequantGroup(src + g * 8, tables + g * kQ4Levels, dst + g * kQ4GroupSize);
    }
    if (full < groups) {  // a last group shorter than 16 columns
      HWY_ALIGN float tmp[kQ4GroupSize];
      DequantGroup(src + full * 8, tables + full * kQ4Levels, tmp);
      std::memcpy(dst + full * kQ4GroupSize, tmp, sizeof(float) * (in - full * kQ4GroupSize));
    }
  }
}

const DequantKernel* GetDequantKernel() {
  static const DequantKernel kernel{hwy::TargetName(HWY_TARGET), &DequantInt8, &DequantQ4};
  return &kernel;
}

}  // namespace HWY_NAMESPACE
}  // namespace
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine::cpu {
namespace {

HWY_EXPORT(GetDequantKernel);

// Run on threads only when the call has enough work to pay for waking them.
constexpr int64_t kParallelMinWork = 16384;
// Dequantized rows per chunk: ~32 KiB of float32 for decode-sized steps (the chunk stays
// in L1/L2 while every activation row passes it), ~512 KiB (L2) for prefill-sized ones,
// which run the chunk past blocks of 64 activation rows: a larger chunk re-reads the
// activations fewer times. The chunking decides which outputs a thread computes, never
// how.
constexpr int64_t kChunkBytes = 32 << 10;
constexpr int64_t kPrefillChunkBytes = 512 << 10;
constexpr int32_t kRowBlock = 64;

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

void Dequantize(const DequantKernel& k, const QuantMatrix& w, int32_t r0, int32_t r1, float* out,
                int32_t ld) {
  (w.kind == WeightQuant::kQ4 ? k.q4 : k.int8)(w, r0, r1, out, ld);
}

}  // namespace

int64_t QuantMatrix::bytes() const {
  return static_cast<int64_t>(codes.size() + (scales.size() + lut.size()) * sizeof(float));
}

absl::Status QuantMatrix::AppendBlock(const QuantizedTensor& t, int64_t r0, int64_t r1, int64_t c0,
                                      int64_t c1) {
  const bool q4 = t.kind == WeightQuant::kQ4;
  if (q4 && (c0 % kQ4GroupSize != 0 || (c1 != t.cols && c1 % kQ4GroupSize != 0))) {
    return absl::InvalidArgumentError(
        absl::StrCat("q4 weights split at column ", c0, "..", c1, " of ", t.cols,
                     ": tensor-parallel shards of a q4 tensor must start at a multiple of ",
                     kQ4GroupSize, " input columns"));
  }
  if (!empty() && (kind != t.kind || in != c1 - c0)) {
    return absl::InternalError("QuantMatrix::AppendBlock: blocks of different kinds or widths");
  }
  kind = t.kind;
  in = static_cast<int32_t>(c1 - c0);
  const int64_t src_rb = t.row_bytes(), b0 = q4 ? c0 / kQ4GroupSize * 8 : c0;
  const int64_t rb = row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* src = &t.codes[static_cast<size_t>(r * src_rb + b0)];
    codes.insert(codes.end(), src, src + rb);
    if (!q4) scales.push_back(t.scales[r]);
  }
  if (q4) {
    const int32_t set = static_cast<int32_t>(lut.size() / (Q4Groups(in) * kQ4Levels));
    const int64_t g0 = c0 / kQ4GroupSize, g1 = g0 + Q4Groups(in);
    for (int64_t i = g0 * kQ4Levels; i < g1 * kQ4Levels; ++i) lut.push_back(F16ToF32(t.lut[i]));
    lut_set.insert(lut_set.end(), r1 - r0, set);
  }
  out += static_cast<int32_t>(r1 - r0);
  return absl::OkStatus();
}

void QuantGemm(const float* x, int32_t rows, const QuantMatrix& w, float* y) {
  if (rows <= 0 || w.out <= 0) return;
  const DequantKernel& k = *HWY_DYNAMIC_DISPATCH(GetDequantKernel)();
  const int32_t in = w.in, out = w.out, ld = (in + 15) / 16 * 16;
  const int64_t bytes = rows > kRowBlock ? kPrefillChunkBytes : kChunkBytes;
  // At least two chunks per thread where the matrix has the rows.
  const int64_t per_thread = (out + 2 * omp_get_max_threads() - 1) / (2 * omp_get_max_threads());
  const int32_t chunk = static_cast<int32_t>(
      std::clamp<int64_t>(bytes / (static_cast<int64_t>(ld) * sizeof(float)), 1,
                          std::min<int64_t>(per_thread, rows > kRowBlock ? 1024 : 64)));
  const int32_t chunks = (out + chunk - 1) / chunk;
  const bool parallel = static_cast<int64_t>(out) * in > kParallelMinWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int32_t i = 0; i < chunks; ++i) {
    const int32_t o0 = i * chunk, o1 = std::min(out, o0 + chunk);
    thread_local AlignedBuffer buf;
    float* wf = buf.Get(static_cast<size_t>(chunk) * ld);
    Dequantize(k, w, o0, o1, wf, ld);
    for (int32_t t = 0; t < rows; t += kRowBlock) {
      SmallGemmPanel(x + static_cast<size_t>(t) * in, std::min(kRowBlock, rows - t), in, wf,
                     o1 - o0, ld, in, y + static_cast<size_t>(t) * out + o0, out);
    }
  }
}

void DequantizeQuantRows(const QuantMatrix& w, int32_t r0, int32_t r1, float* out, int32_t ld) {
  Dequantize(*HWY_DYNAMIC_DISPATCH(GetDequantKernel)(), w, r0, r1, out, ld);
}

const char* QuantGemmKernelName() { return HWY_DYNAMIC_DISPATCH(GetDequantKernel)()->target; }

}  // namespace superpose::engine::cpu
#endif  // HWY_ONCE
