// The body of the tensor-core prefill attention kernel (flash-attention style; one CUDA
// block: one tile of a sequence's new tokens x one kv head, like cuda/attention_body.h),
// written against a small warp-matrix API supplied by the execution context, so that it
// runs in two places: cuda/kernels.cu maps the API to nvcuda::wmma (bf16 16x16x16
// fragments, float accumulators), tests/attention_emulation_test.cc to plain loops with
// the same math on CPU threads (one per CUDA thread, barriers for sync()/warp_sync()).
//
// The block's query rows (tokens x group, row r = token r / G, head r % G, at most
// kTcRows) are split into 16-row slices, one per warp. Per key tile of kTcKeys keys,
// gathered through the sequence's key list from the paged pool into shared memory as
// bf16: each warp computes S = Q K^T for its 16 rows (fp32), lanes 0..15 run the
// online softmax of one row each (scale, causal mask, running max and sum) and write P
// as bf16, then the warp rescales its rows of the O accumulator and adds P V. O stays in
// shared memory as float32, so that the per-row rescale never depends on the (opaque)
// layout of accumulator fragments.
//
// Ctx, on top of tid(), nthreads(), sync(), store(KV*, i, float) of attention_body.h:
//   typename bf16                       16-bit storage type of bf16 values
//   typename FragA, FragBc, FragBr, FragC
//                                       16x16 fragments: A row-major, B column-major,
//                                       B row-major (bf16), accumulator (float)
//   int warp(), lane()                  tid() / 32, tid() % 32
//   void warp_sync()                    barrier + memory fence of the calling warp
//   bf16 to_bf16(float), float to_float(bf16)
//   void copy8(bf16* dst, const KV* src)  8 consecutive elements (16 bytes on the device;
//                                       both 16-byte aligned: D is a multiple of 16)
//   Warp-collective (every lane of the warp calls it, with the same arguments; every
//   lane sees the result; memory written by lanes must be fenced by warp_sync() before
//   a collective load reads it, and a collective store by warp_sync() before lanes read):
//   void fill_c(FragC&)                 zeros
//   void load_a(FragA&, const bf16* p, int ldm)    element (i, k) at p[i * ldm + k]
//   void load_b_col(FragBc&, const bf16* p, int ldm) element (k, j) at p[j * ldm + k]
//   void load_b_row(FragBr&, const bf16* p, int ldm) element (k, j) at p[k * ldm + j]
//   void load_c(FragC&, const float* p, int ldm)   element (i, j) at p[i * ldm + j]
//   void store_c(float* p, const FragC&, int ldm)
//   void mma(FragC& d, const FragA&, const FragB{c,r}&, const FragC& c)  d = a b + c
// Pointers given to loads and stores are 32-byte aligned, ldm a multiple of 8 (bf16)
// or 4 (float), as wmma requires; smem must be 128-byte aligned.
#pragma once

#include <math.h>
#include <cstddef>
#include <cstdint>

#include "cuda/attn_tile.h"

namespace superpose::cuda {

constexpr int kTcThreads = 128;  // 4 warps
constexpr int kTcRows = 64;      // query rows per block, 16 per warp
constexpr int kTcKeys = 64;      // keys per K/V tile
constexpr int kTcMaxHeadDim = 128;
constexpr int kTcLdS = kTcKeys + 4;  // scores, float
constexpr int kTcLdP = kTcKeys + 8;  // probabilities, bf16
static_assert(kTcRows == 16 * (kTcThreads / 32), "one 16-row slice per warp");
static_assert(kTcKeys == kTcRows, "Q, K and V buffers share one size");

// Whether the tensor-core kernel handles head_dim D with G query heads per kv head (and
// then tiles of at most kTcRows / G tokens).
SP_ATTN_HD inline constexpr bool TcAttentionSupported(int32_t D, int32_t G) {
  return D > 0 && D % 16 == 0 && D <= kTcMaxHeadDim && G >= 1 && G <= kTcRows;
}
// Row pitches (elements) of Q, K, V (bf16) and O (float): padded against bank conflicts,
// multiples of 8 resp. 4 elements so that every 16x16 fragment starts 32-byte aligned.
SP_ATTN_HD inline constexpr int32_t TcLdQkv(int32_t D) { return D + 8; }
SP_ATTN_HD inline constexpr int32_t TcLdO(int32_t D) { return D + 4; }

// Dynamic shared memory of one block, in bytes: Q, K, V | S | P | O | max, sum, alpha.
SP_ATTN_HD inline constexpr size_t TcAttentionSharedBytes(int32_t D) {
  return 3 * static_cast<size_t>(kTcRows) * TcLdQkv(D) * 2 +
         static_cast<size_t>(kTcRows) * kTcLdS * 4 + static_cast<size_t>(kTcRows) * kTcLdP * 2 +
         static_cast<size_t>(kTcRows) * TcLdO(D) * 4 + 3 * static_cast<size_t>(kTcRows) * 4;
}

// q: [T, qh, D] float; out: [T, qh, D]; the query heads of kv head g are g*G .. g*G+G-1;
// tile.ntok * G <= kTcRows, TcAttentionSupported(D, G); c.nthreads() == kTcThreads.
template <class Ctx, class KV>
SP_ATTN_FN void TcAttentionBlock(Ctx& c, const AttnTile tile, int32_t g, unsigned char* smem,
                                 const float* q, const KV* kc, const KV* vc, const int32_t* keys,
                                 int32_t qh, int32_t kvh, int32_t D, int32_t G, float scale,
                                 KV* out) {
  using B16 = typename Ctx::bf16;
  const int32_t rows = tile.ntok * G;
  const int32_t ld = TcLdQkv(D), ldo = TcLdO(D);
  B16* qs = reinterpret_cast<B16*>(smem);                       // [kTcRows][ld]
  B16* ks = qs + kTcRows * ld;                                  // [kTcKeys][ld]
  B16* vs = ks + kTcKeys * ld;                                  // [kTcKeys][ld]
  float* sc = reinterpret_cast<float*>(vs + kTcKeys * ld);      // [kTcRows][kTcLdS]
  B16* ps = reinterpret_cast<B16*>(sc + kTcRows * kTcLdS);      // [kTcRows][kTcLdP]
  float* os = reinterpret_cast<float*>(ps + kTcRows * kTcLdP);  // [kTcRows][ldo]
  float* mrow = os + kTcRows * ldo;                             // running max (of scaled scores)
  float* lrow = mrow + kTcRows;                                 // running sum
  float* arow = lrow + kTcRows;  // rescale factor of the current tile
  const int tid = c.tid(), nthreads = c.nthreads();
  const int lane = c.lane();
  const int32_t r0 = 16 * c.warp();  // this warp's rows r0 .. r0 + 15
  const bool active = r0 < rows;     // warp-uniform

  // Q as bf16 (rows past `rows` zero), O zero.
  for (int32_t idx = tid; idx < kTcRows * D; idx += nthreads) {
    const int32_t r = idx / D, d = idx - r * D;
    float v = 0.0f;
    if (r < rows) {
      const int32_t tok = r / G, gg = r - tok * G;
      const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
      v = q[(t * qh + g * G + gg) * D + d];
    }
    qs[r * ld + d] = c.to_bf16(v);
    os[r * ldo + d] = 0.0f;
  }
  for (int32_t r = tid; r < kTcRows; r += nthreads) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.0f;
    arow[r] = 0.0f;
  }
  const int32_t base = tile.ctx_len + tile.i0;  // row r sees keys [0, base + r / G]
  const int32_t nk = base + tile.ntok;          // keys the last token sees
  // Keys any row of this warp sees (a key tile past them needs no matrix work).
  const int32_t last_row = (r0 + 15 < rows ? r0 + 15 : rows - 1);
  const int32_t warp_nk = active ? base + last_row / G + 1 : 0;
  const int32_t* seq_keys = keys + tile.key_off;
  const B16 zero = c.to_bf16(0.0f);
  for (int32_t kb = 0; kb < nk; kb += kTcKeys) {
    const int32_t kn = nk - kb < kTcKeys ? nk - kb : kTcKeys;
    c.sync();  // the previous tile's readers are done
    // 8 elements (16 bytes) per copy. K and V rows past kn are zero: P is 0 there,
    // and 0 * (stale NaN) would not be.
    const int32_t d8 = D / 8;
    for (int32_t idx = tid; idx < kTcKeys * d8; idx += nthreads) {
      const int32_t j = idx / d8, d = (idx - j * d8) * 8;
      if (j < kn) {
        const int64_t off = (static_cast<int64_t>(seq_keys[kb + j]) * kvh + g) * D + d;
        c.copy8(ks + j * ld + d, kc + off);
        c.copy8(vs + j * ld + d, vc + off);
      } else {
        for (int32_t e = 0; e < 8; ++e) ks[j * ld + d + e] = vs[j * ld + d + e] = zero;
      }
    }
    c.sync();
    if (!active) continue;  // warp-uniform: a warp without rows only joins the syncs
    // Columns [0, 16 * nb) of S are computed; every key a row of this warp sees is there.
    const int32_t wn = warp_nk - kb < kn ? warp_nk - kb : kn;
    const int32_t nb = wn > 0 ? (wn + 15) / 16 : 0;
    for (int32_t n = 0; n < nb; ++n) {
      typename Ctx::FragC s;
      c.fill_c(s);
      for (int32_t k = 0; k < D; k += 16) {
        typename Ctx::FragA a;
        typename Ctx::FragBc b;
        c.load_a(a, qs + r0 * ld + k, ld);
        c.load_b_col(b, ks + (16 * n) * ld + k, ld);  // K^T
        c.mma(s, a, b, s);
      }
      c.store_c(sc + r0 * kTcLdS + 16 * n, s, kTcLdS);
    }
    c.warp_sync();
    if (lane < 16) {
      const int32_t r = r0 + lane;
      const int32_t visible = r < rows ? base + r / G + 1 : 0;  // causal limit
      // Keys [0, lim) of this tile are visible to row r (lim <= wn).
      const int32_t lim = visible - kb < kn ? visible - kb : kn;
      const float* sr = sc + r * kTcLdS;
      B16* pr = ps + r * kTcLdP;
      const float m_old = mrow[r];
      float mx = m_old;
      for (int32_t j = 0; j < lim; ++j) mx = fmaxf(mx, sr[j] * scale);
      const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - mx);
      // The sum is of the bf16 probabilities that P V multiplies, so that the weights
      // of the output are exactly normalised.
      float sum = 0.0f;
      for (int32_t j = 0; j < 16 * nb; ++j) {
        const B16 p = c.to_bf16(j < lim ? expf(sr[j] * scale - mx) : 0.0f);
        pr[j] = p;
        sum += c.to_float(p);
      }
      lrow[r] = lrow[r] * alpha + sum;
      mrow[r] = mx;
      arow[r] = alpha;
    }
    c.warp_sync();
    for (int32_t idx = lane; idx < 16 * D; idx += 32) {
      const int32_t r = r0 + idx / D, d = idx % D;
      os[r * ldo + d] *= arow[r];
    }
    c.warp_sync();
    for (int32_t d0 = 0; d0 < D; d0 += 16) {
      typename Ctx::FragC o;
      c.load_c(o, os + r0 * ldo + d0, ldo);
      for (int32_t n = 0; n < nb; ++n) {
        typename Ctx::FragA p;
        typename Ctx::FragBr v;
        c.load_a(p, ps + r0 * kTcLdP + 16 * n, kTcLdP);
        c.load_b_row(v, vs + (16 * n) * ld + d0, ld);
        c.mma(o, p, v, o);
      }
      c.store_c(os + r0 * ldo + d0, o, ldo);
    }
  }
  c.sync();
  for (int32_t idx = tid; idx < rows * D; idx += nthreads) {
    const int32_t r = idx / D, d = idx - r * D;
    const int32_t tok = r / G, gg = r - tok * G;
    const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
    const float l = lrow[r];
    c.store(out, (t * qh + g * G + gg) * D + d, l > 0.0f ? os[r * ldo + d] / l : 0.0f);
  }
}

}  // namespace superpose::cuda
