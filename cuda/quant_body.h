// The per-element math and the per-warp body of the CUDA backend's dequantizing GEMM
// (cuda/quant_kernels.cu), written once for two callers: the kernels run it on the GPU,
// and tests/quant_emulation_test.cc runs it on CPU threads (one std::thread per lane, a
// barrier for the warp shuffles), so that the formats' indexing (int8 rows, q4 nibbles,
// table sets of fused matrices, a last group shorter than 16 columns) is checked against
// engine::DequantizeRows on machines without a GPU. Plain C++ apart from SP_ATTN_FN.
//
// The formats are engine/model/quantize.h's: int8 w' = float(code) * scale[row]; q4
// w' = lut[set(row)][column / 16][nibble], the tables float16. QuantWeight gives exactly
// those float32 values (the one definition); the streaming body multiplies them by the
// bf16 activations and accumulates in float32.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cuda/attn_tile.h"
#include "engine/row_sampling.h"  // RsBits, RsFloat

namespace superpose::cuda {

using engine::RsBits;
using engine::RsFloat;

constexpr int32_t kQuantInt8 = 1;    // engine::WeightQuant::kInt8
constexpr int32_t kQuantQ4 = 2;      // engine::WeightQuant::kQ4
constexpr int32_t kQuantGroup = 16;  // engine::kQ4GroupSize
constexpr int kQuantWarp = 32;       // lanes of one warp
// Loops over a register array (kMaxT) unrolled on the device, so that it stays in
// registers.
#if defined(__CUDA_ARCH__)
#define SP_QUANT_UNROLL _Pragma("unroll")
#else
#define SP_QUANT_UNROLL
#endif

// Tokens a streaming call (a decode step) holds in registers: up to this many rows of
// activations share one pass over the weights.
constexpr int32_t kQuantStreamMaxT = 16;

// A quantized W[out, in] in device memory (or host memory, in the emulation tests).
struct QuantView {
  int32_t kind = 0;  // kQuantInt8 or kQuantQ4
  int32_t out = 0, in = 0;
  int32_t groups = 0;  // q4: ceil(in / 16)
  // Wide loads (QuantVectorizable): int8 4 codes and 4 activations at once, q4 a group's
  // 8 code bytes and 2 x 8 activations: the same products summed in the same order.
  int32_t vec = 0;
  int64_t row_bytes = 0;             // int8: in; q4: groups * 8
  const uint8_t* codes = nullptr;    // [out, row_bytes]
  const float* scales = nullptr;     // int8: [out]
  const uint16_t* lut = nullptr;     // q4: [sets, groups, 16] float16 bits
  const int32_t* lut_set = nullptr;  // q4: [out]
};

SP_ATTN_FN float QuantBf16ToFloat(uint16_t v) { return RsFloat(static_cast<uint32_t>(v) << 16); }

// Round to nearest even, NaN kept quiet with its sign (engine::F32ToBf16's rule).
SP_ATTN_FN uint16_t QuantFloatToBf16(float v) {
  const uint32_t x = RsBits(v);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// IEEE float16 bits to float32, exactly (subnormals, infinities and NaN included).
SP_ATTN_FN float QuantHalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 31u, mant = h & 1023u;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float32
    const float m = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return (sign != 0) ? -m : m;
  }
  if (exp == 31) return RsFloat(sign | 0x7F800000u | (mant << 13));
  return RsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Wide loads: n bytes at p, n-aligned on the device; words little-endian.
struct QuantWords2 {
  uint32_t w[2];
};
struct QuantWords4 {
  uint32_t w[4];
};

SP_ATTN_FN uint32_t QuantLoad4(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const uint32_t*>(p);
#else
  uint32_t v;
  memcpy(&v, p, sizeof(v));
  return v;
#endif
}

SP_ATTN_FN QuantWords2 QuantLoad8(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint2 u = *static_cast<const uint2*>(p);
  return QuantWords2{{u.x, u.y}};
#else
  QuantWords2 v;
  memcpy(v.w, p, sizeof(v.w));
  return v;
#endif
}

SP_ATTN_FN QuantWords4 QuantLoad16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 u = *static_cast<const uint4*>(p);
  return QuantWords4{{u.x, u.y, u.z, u.w}};
#else
  QuantWords4 v;
  memcpy(v.w, p, sizeof(v.w));
  return v;
#endif
}

// Element j (0 or 1) of a word of two bf16 values, as float.
SP_ATTN_FN float QuantBf16Of(uint32_t word, int j) {
  return RsFloat(j == 0 ? word << 16 : word & 0xFFFF0000u);
}

// Whether the wide loads are aligned for W and activations at x: int8 rows of a
// multiple of 4 columns, q4 rows of whole groups (a multiple of 16 columns), x aligned
// to 4 resp. 8 activations (and so every token's row of x).
SP_ATTN_HD inline bool QuantVectorizable(const QuantView& w, const void* x) {
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), ca = reinterpret_cast<uintptr_t>(w.codes);
  if (w.kind == kQuantInt8) return w.in % 4 == 0 && xa % 8 == 0 && ca % 4 == 0;
  return w.in % kQuantGroup == 0 && xa % 16 == 0 && ca % 8 == 0;
}

// The q4 table entry of row r, column c, index idx.
SP_ATTN_FN float Q4Entry(const QuantView& w, int32_t r, int32_t c, uint32_t idx) {
  const int64_t set = w.lut_set[r];
  const int64_t at = (set * w.groups + c / kQuantGroup) * kQuantGroup + idx;
  return QuantHalfToFloat(w.lut[at]);
}

// The dequantized W'[r, c] (engine::DequantizeRows's value, bit for bit).
SP_ATTN_FN float QuantWeight(const QuantView& w, int32_t r, int32_t c) {
  const uint8_t* row = w.codes + static_cast<int64_t>(r) * w.row_bytes;
  if (w.kind == kQuantInt8) {
    return static_cast<float>(static_cast<int8_t>(row[c])) * w.scales[r];
  }
  // Group g's 8 bytes: byte j holds column 16g + j (low nibble) and 16g + 8 + j (high).
  const int32_t g = c / kQuantGroup, j = c % kQuantGroup;
  const uint8_t b = row[g * (kQuantGroup / 2) + (j & 7)];
  return Q4Entry(w, r, c, j < 8 ? (b & 15u) : (b >> 4));
}

// One element of the prefill path's scratch matrix: W'[r, c] rounded to bf16.
SP_ATTN_FN uint16_t QuantDequantBf16(const QuantView& w, int32_t r, int32_t c) {
  return QuantFloatToBf16(QuantWeight(w, r, c));
}

// acc[t] += w' * x[t, c] for the tile's rows.
template <int kMaxT>
SP_ATTN_FN void QuantAccumulate(float (&acc)[kMaxT], float wv, const uint16_t* x, int64_t ldx,
                                int32_t nt, int32_t c) {
  SP_QUANT_UNROLL
  for (int t = 0; t < kMaxT; ++t) {
    if (t < nt) acc[t] += wv * QuantBf16ToFloat(x[t * ldx + c]);
  }
}

// QuantLanePartial's int8 columns c0 .. c0 + 3 with wide loads (w.vec).
template <int kMaxT>
SP_ATTN_FN void QuantInt8Wide(const uint8_t* row, float scale, const uint16_t* x, int64_t ldx,
                              int32_t nt, int32_t c0, float (&acc)[kMaxT]) {
  const uint32_t codes = QuantLoad4(row + c0);
  float wv[4];
  SP_QUANT_UNROLL
  for (int k = 0; k < 4; ++k) {
    wv[k] = static_cast<float>(static_cast<int8_t>((codes >> (8 * k)) & 0xFFu)) * scale;
  }
  SP_QUANT_UNROLL
  for (int t = 0; t < kMaxT; ++t) {
    if (t >= nt) continue;
    const QuantWords2 xv = QuantLoad8(x + t * ldx + c0);
    float a = acc[t];
    SP_QUANT_UNROLL
    for (int k = 0; k < 4; ++k) a += wv[k] * QuantBf16Of(xv.w[k / 2], k % 2);
    acc[t] = a;
  }
}

// QuantLanePartial's q4 group of 16 columns at c0 with wide loads (w.vec): the same
// order of sums (column c0 + j, then c0 + 8 + j, for j = 0 .. 7).
template <int kMaxT>
SP_ATTN_FN void QuantQ4Wide(const uint8_t* b, const uint16_t* lut, const uint16_t* x, int64_t ldx,
                            int32_t nt, int32_t c0, float (&acc)[kMaxT]) {
  const QuantWords2 codes = QuantLoad8(b);
  float lo[8], hi[8];
  SP_QUANT_UNROLL
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = (codes.w[j / 4] >> (8 * (j % 4))) & 0xFFu;
    lo[j] = QuantHalfToFloat(lut[byte & 15u]);
    hi[j] = QuantHalfToFloat(lut[byte >> 4]);
  }
  SP_QUANT_UNROLL
  for (int t = 0; t < kMaxT; ++t) {
    if (t >= nt) continue;
    const QuantWords4 xl = QuantLoad16(x + t * ldx + c0);
    const QuantWords4 xh = QuantLoad16(x + t * ldx + c0 + 8);
    float a = acc[t];
    SP_QUANT_UNROLL
    for (int j = 0; j < 8; ++j) {
      a += lo[j] * QuantBf16Of(xl.w[j / 2], j % 2);
      a += hi[j] * QuantBf16Of(xh.w[j / 2], j % 2);
    }
    acc[t] = a;
  }
}

// A lane's share of row r: int8 columns 4 * lane + 128 k .. + 3 (the warp reads 128
// consecutive code bytes per pass); q4 groups lane + 32 k (8 bytes each: 256 per pass).
template <int kMaxT>
SP_ATTN_FN void QuantLanePartial(const QuantView& w, int32_t r, const uint16_t* x, int32_t nt,
                                 int lane, float (&acc)[kMaxT]) {
  const int64_t ldx = w.in;
  const uint8_t* row = w.codes + static_cast<int64_t>(r) * w.row_bytes;
  if (w.kind == kQuantInt8) {
    const float scale = w.scales[r];
    for (int32_t c0 = 4 * lane; c0 < w.in; c0 += 4 * kQuantWarp) {
      if (w.vec) {
        QuantInt8Wide(row, scale, x, ldx, nt, c0, acc);
        continue;
      }
      const int32_t n = w.in - c0 < 4 ? w.in - c0 : 4;
      for (int32_t k = 0; k < n; ++k) {
        const float wv = static_cast<float>(static_cast<int8_t>(row[c0 + k])) * scale;
        QuantAccumulate(acc, wv, x, ldx, nt, c0 + k);
      }
    }
    return;
  }
  const uint16_t* tab = w.lut + static_cast<int64_t>(w.lut_set[r]) * w.groups * kQuantGroup;
  for (int32_t g = lane; g < w.groups; g += kQuantWarp) {
    const uint8_t* b = row + g * (kQuantGroup / 2);
    const uint16_t* lut = tab + g * kQuantGroup;
    const int32_t c0 = g * kQuantGroup;
    if (w.vec) {
      QuantQ4Wide(b, lut, x, ldx, nt, c0, acc);
      continue;
    }
    for (int32_t j = 0; j < kQuantGroup / 2; ++j) {
      const uint8_t byte = b[j];
      if (c0 + j < w.in) {
        QuantAccumulate(acc, QuantHalfToFloat(lut[byte & 15u]), x, ldx, nt, c0 + j);
      }
      if (c0 + 8 + j < w.in) {
        QuantAccumulate(acc, QuantHalfToFloat(lut[byte >> 4]), x, ldx, nt, c0 + 8 + j);
      }
    }
  }
}

// One warp's output row r for tokens [t0, t0 + nt) (nt <= kMaxT): y[t, r] = sum_c
// W'[r, c] * x[t, c], float32 accumulation, each weight byte read once for all nt
// tokens. x: [T, in] bf16 bits; y: [T, out]. Warp: lane() in [0, 32), sum(float (&v)[N])
// (every lane gets each v[i] summed over the warp, by a butterfly of xor shuffles).
template <int kMaxT, class Warp>
SP_ATTN_FN void QuantGemvWarp(Warp& wp, const QuantView& w, const uint16_t* x, int32_t t0,
                              int32_t nt, int32_t r, float* y) {
  float acc[kMaxT];
  SP_QUANT_UNROLL
  for (int t = 0; t < kMaxT; ++t) acc[t] = 0.0f;
  QuantLanePartial<kMaxT>(w, r, x + static_cast<int64_t>(t0) * w.in, nt, wp.lane(), acc);
  wp.sum(acc);
  if (wp.lane() != 0) return;
  SP_QUANT_UNROLL
  for (int t = 0; t < kMaxT; ++t) {
    if (t < nt) y[static_cast<int64_t>(t0 + t) * w.out + r] = acc[t];
  }
}

}  // namespace superpose::cuda
