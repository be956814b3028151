// The body of the paged-attention kernel (one CUDA block: one tile of a sequence's new
// tokens x one kv head), written once for two callers: cuda/kernels.cu runs it as a
// CUDA block, and tests/attention_emulation_test.cc runs it on CPU threads with a
// barrier for sync(), so that its indexing, causal masking and online softmax are
// tested on machines without a GPU. Plain C++ apart from SP_ATTN_FN.
//
// Ctx: tid(), nthreads(), sync() (a block-wide barrier), load(const KV*, i) -> float,
// store(KV*, i, float). smem: AttentionSharedFloats(tile.ntok * G, D) floats.
#pragma once

#include <math.h>
#include <cstddef>
#include <cstdint>

#include "cuda/attn_tile.h"

namespace superpose::cuda {

constexpr int kAttnThreads = 128;
constexpr int kKeyTile = 32;

// Shared memory of one block with `rows` query rows (tokens x group), in floats.
inline constexpr size_t AttentionSharedFloats(int32_t rows, int32_t D) {
  return 2 * static_cast<size_t>(rows) * D + 2 * static_cast<size_t>(kKeyTile) * (D + 1) +
         static_cast<size_t>(rows) * kKeyTile + 3 * static_cast<size_t>(rows);
}

// Online softmax over key tiles of kKeyTile keys; K/V tiles, the queries (pre-scaled),
// accumulators and scores live in shared memory (float32); K/V rows are padded to
// D + 1 floats so that a warp reading 32 keys at one d hits 32 different banks.
// q: [T, qh, D]; out: [T, qh, D]; the query heads of kv head g are g*G .. g*G+G-1.
template <class Ctx, class KV>
SP_ATTN_FN void AttentionBlock(Ctx& c, const AttnTile tile, int32_t g, float* smem, const float* q,
                               const KV* kc, const KV* vc, const int32_t* keys, int32_t qh,
                               int32_t kvh, int32_t D, int32_t G, float scale, KV* out) {
  const int32_t rows = tile.ntok * G;
  const int32_t Dp = D + 1;
  float* qs = smem;                    // [rows][D]
  float* acc = qs + rows * D;          // [rows][D]
  float* ks = acc + rows * D;          // [kKeyTile][Dp]
  float* vs = ks + kKeyTile * Dp;      // [kKeyTile][Dp]
  float* sc = vs + kKeyTile * Dp;      // [rows][kKeyTile]
  float* mrow = sc + rows * kKeyTile;  // running max
  float* lrow = mrow + rows;           // running sum
  float* arow = lrow + rows;           // rescale factor of the current tile
  const int tid = c.tid(), nthreads = c.nthreads();

  for (int32_t idx = tid; idx < rows * D; idx += nthreads) {
    const int32_t r = idx / D, d = idx - r * D;
    const int32_t tok = r / G, gg = r - tok * G;
    const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
    qs[idx] = q[(t * qh + g * G + gg) * D + d] * scale;
    acc[idx] = 0.0f;
  }
  for (int32_t r = tid; r < rows; r += nthreads) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.0f;
    arow[r] = 0.0f;
  }
  const int32_t nk = tile.ctx_len + tile.i0 + tile.ntok;  // keys the last token sees
  const int32_t* seq_keys = keys + tile.key_off;
  for (int32_t kb = 0; kb < nk; kb += kKeyTile) {
    const int32_t kn = nk - kb < kKeyTile ? nk - kb : kKeyTile;
    c.sync();  // the previous tile's readers are done
    for (int32_t idx = tid; idx < kn * D; idx += nthreads) {
      const int32_t j = idx / D, d = idx - j * D;
      const int64_t off = (static_cast<int64_t>(seq_keys[kb + j]) * kvh + g) * D + d;
      ks[j * Dp + d] = c.load(kc, off);
      vs[j * Dp + d] = c.load(vc, off);
    }
    c.sync();
    for (int32_t idx = tid; idx < rows * kKeyTile; idx += nthreads) {
      const int32_t r = idx / kKeyTile, j = idx - r * kKeyTile;
      const int32_t visible = tile.ctx_len + tile.i0 + r / G + 1;  // causal limit
      float s = -INFINITY;
      if (j < kn && kb + j < visible) {
        const float* qr = qs + r * D;
        const float* kr = ks + j * Dp;
        float dot = 0.0f;
        for (int32_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
        s = dot;
      }
      sc[idx] = s;
    }
    c.sync();
    for (int32_t r = tid; r < rows; r += nthreads) {
      float* sr = sc + r * kKeyTile;
      const float m_old = mrow[r];
      float mx = m_old;
      for (int32_t j = 0; j < kKeyTile; ++j) mx = fmaxf(mx, sr[j]);
      const float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - mx);
      float sum = 0.0f;
      for (int32_t j = 0; j < kKeyTile; ++j) {
        const float p = sr[j] == -INFINITY ? 0.0f : expf(sr[j] - mx);
        sr[j] = p;
        sum += p;
      }
      lrow[r] = lrow[r] * alpha + sum;
      mrow[r] = mx;
      arow[r] = alpha;
    }
    c.sync();
    for (int32_t idx = tid; idx < rows * D; idx += nthreads) {
      const int32_t r = idx / D, d = idx - r * D;
      const float* pr = sc + r * kKeyTile;
      float a = acc[idx] * arow[r];
      for (int32_t j = 0; j < kn; ++j) a += pr[j] * vs[j * Dp + d];
      acc[idx] = a;
    }
  }
  c.sync();
  for (int32_t idx = tid; idx < rows * D; idx += nthreads) {
    const int32_t r = idx / D, d = idx - r * D;
    const int32_t tok = r / G, gg = r - tok * G;
    const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
    const float l = lrow[r];
    c.store(out, (t * qh + g * G + gg) * D + d, l > 0.0f ? acc[idx] / l : 0.0f);
  }
}

}  // namespace superpose::cuda
