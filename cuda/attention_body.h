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

// Split-K ("flash decoding"): with few sequences a decode step has too few (tile, kv
// head) blocks to fill the GPU, and each walks its whole context alone. Then every
// block's keys are cut into `nsplit` ranges of at least `min_keys` keys (a multiple of
// kKeyTile), one block each; a range past the end is empty. Each split block writes
// its unnormalised accumulators and its running max and sum (SplitPartialFloats per
// block), and AttentionCombine merges the splits of a (tile, kv head).
constexpr int32_t kSplitMinKeys = 256;
constexpr int32_t kMaxSplits = 16;

inline constexpr size_t SplitPartialFloats(int32_t rows, int32_t D) {
  return static_cast<size_t>(rows) * (D + 2);
}

// Keys [*k0, *k1) of split s of nsplit over nk keys.
SP_ATTN_FN void SplitRange(int32_t nk, int32_t s, int32_t nsplit, int32_t min_keys, int32_t* k0,
                           int32_t* k1) {
  if (nsplit <= 1) {
    *k0 = 0;
    *k1 = nk;
    return;
  }
  int32_t chunk = (nk + nsplit - 1) / nsplit;
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
  if (chunk < min_keys) chunk = min_keys;
  const int64_t b = static_cast<int64_t>(s) * chunk;
  *k0 = b < nk ? static_cast<int32_t>(b) : nk;
  *k1 = nk - *k0 > chunk ? *k0 + chunk : nk;
}

// Where split block (tile_index, g, s) writes: [rows][D] accumulators, [rows] max,
// [rows] sum, `stride` floats per block.
struct SplitOut {
  float* part = nullptr;  // null: no split, normalise and store into `out`
  int32_t tile_index = 0, split = 0, nsplit = 1, min_keys = kSplitMinKeys;
  size_t stride = 0;
};

// Online softmax over key tiles of kKeyTile keys; K/V tiles, the queries (pre-scaled),
// accumulators and scores live in shared memory (float32); K/V rows are padded to
// D + 1 floats so that a warp reading 32 keys at one d hits 32 different banks.
// q: [T, qh, D]; out: [T, qh, D]; the query heads of kv head g are g*G .. g*G+G-1.
template <class Ctx, class KV>
SP_ATTN_FN void AttentionBlock(Ctx& c, const AttnTile tile, int32_t g, float* smem, const float* q,
                               const KV* kc, const KV* vc, const int32_t* keys, int32_t qh,
                               int32_t kvh, int32_t D, int32_t G, float scale, KV* out,
                               const SplitOut& so = SplitOut{}) {
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
  int32_t k0 = 0, k1 = nk;
  if (so.part != nullptr) SplitRange(nk, so.split, so.nsplit, so.min_keys, &k0, &k1);
  const int32_t* seq_keys = keys + tile.key_off;
  for (int32_t kb = k0; kb < k1; kb += kKeyTile) {
    const int32_t kn = k1 - kb < kKeyTile ? k1 - kb : kKeyTile;
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
  if (so.part != nullptr) {
    float* p = so.part +
               ((static_cast<size_t>(so.tile_index) * kvh + g) * so.nsplit + so.split) * so.stride;
    for (int32_t idx = tid; idx < rows * D; idx += nthreads) p[idx] = acc[idx];
    for (int32_t r = tid; r < rows; r += nthreads) {
      p[rows * D + r] = mrow[r];
      p[rows * D + rows + r] = lrow[r];
    }
    return;
  }
  for (int32_t idx = tid; idx < rows * D; idx += nthreads) {
    const int32_t r = idx / D, d = idx - r * D;
    const int32_t tok = r / G, gg = r - tok * G;
    const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
    const float l = lrow[r];
    c.store(out, (t * qh + g * G + gg) * D + d, l > 0.0f ? acc[idx] / l : 0.0f);
  }
}

// Merges the nsplit partial results of (tile, kv head g) written by AttentionBlock
// with SplitOut{part, tile_index, ..., stride}: out = sum_s acc_s e^(m_s - M) /
// sum_s l_s e^(m_s - M), M = max_s m_s (empty splits have m = -inf and weigh 0).
template <class Ctx, class KV>
SP_ATTN_FN void AttentionCombine(Ctx& c, const AttnTile tile, int32_t tile_index, int32_t g,
                                 const float* part, int32_t nsplit, size_t stride, int32_t qh,
                                 int32_t kvh, int32_t D, int32_t G, KV* out) {
  const int32_t rows = tile.ntok * G;
  const float* base = part + (static_cast<size_t>(tile_index) * kvh + g) * nsplit * stride;
  for (int32_t idx = c.tid(); idx < rows * D; idx += c.nthreads()) {
    const int32_t r = idx / D, d = idx - r * D;
    float M = -INFINITY;
    for (int32_t s = 0; s < nsplit; ++s) M = fmaxf(M, base[s * stride + rows * D + r]);
    float num = 0.0f, den = 0.0f;
    if (M != -INFINITY) {
      for (int32_t s = 0; s < nsplit; ++s) {
        const float* p = base + s * stride;
        const float m = p[rows * D + r];
        if (m == -INFINITY) continue;
        const float w = expf(m - M);
        num += p[idx] * w;
        den += p[rows * D + rows + r] * w;
      }
    }
    const int32_t tok = r / G, gg = r - tok * G;
    const int64_t t = static_cast<int64_t>(tile.tok0) + tok;
    c.store(out, (t * qh + g * G + gg) * D + d, den > 0.0f ? num / den : 0.0f);
  }
}

}  // namespace superpose::cuda
