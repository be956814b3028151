// The bodies of LazyLLM's score-row kernels (docs/architecture.md "LazyLLM", the CUDA
// forward): at a sequence's boundary layer, the softmax row of its last new token over
// the stage's keys for each local query head (LazyHeadRowBlock: one block per (item,
// head)), then the sum of those rows over the heads in head order (LazyHeadSumBlock:
// one block per item). Written once for cuda/lazy_kernels.cu and for
// tests/lazy_emulation_test.cc, which runs them on CPU threads. Plain C++ apart from
// SP_ATTN_FN.
//
// Each key's logit is a float32 dot product of the query (after RoPE, unscaled) with
// the key as the pool stores it, times `scale`; the softmax subtracts the row's max
// and divides by the row's sum (block reductions of a fixed order), so a sequence's
// scores do not depend on the other sequences of its step.
//
// Ctx: tid(), nthreads() (a power of two), sync() (a block-wide barrier),
// load(const KV*, i) -> float.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda/block_reduce.h"

namespace superpose::cuda {

constexpr int kLazyThreads = 256;

// One score row: query row `row` of the step, its sequence's `nk` keys at
// keys[key_off ..], results at out[out_off ..] (and the per-head rows at
// head_rows[out_off * qh + h * nk ..]).
struct LazyScoreItem {
  int32_t row = 0, key_off = 0, nk = 0, out_off = 0;
};
static_assert(sizeof(LazyScoreItem) == 4 * sizeof(int32_t), "packed into int32 words");

// head_rows[item.out_off * qh + h * nk + k] = softmax_k(scale * q[row, h] . K[keys[k]])
// for query head h of kv head h / (qh / kvh). q: [rows, qh, D] float; kc: this layer's
// key cache ([slot][kvh][D], slot = block * block_size + slot in block); red:
// nthreads() floats of shared memory.
template <class Ctx, class KV>
SP_ATTN_FN void LazyHeadRowBlock(Ctx& c, const LazyScoreItem item, int32_t h, const float* q,
                                 const KV* kc, const int32_t* keys, int32_t qh, int32_t kvh,
                                 int32_t D, float scale, float* red, float* head_rows) {
  const int tid = c.tid(), N = c.nthreads();
  const int32_t g = h / (qh / kvh), nk = item.nk;
  const float* qr = q + (static_cast<int64_t>(item.row) * qh + h) * D;
  const int32_t* k_of = keys + item.key_off;
  float* p = head_rows + static_cast<size_t>(item.out_off) * qh + static_cast<size_t>(h) * nk;
  // Each thread owns keys tid, tid + N, ...: it alone writes and reads them.
  float mx = -INFINITY;
  for (int32_t k = tid; k < nk; k += N) {
    const int64_t base = (static_cast<int64_t>(k_of[k]) * kvh + g) * D;
    float dot = 0.0f;
    for (int32_t d = 0; d < D; ++d) dot += qr[d] * c.load(kc, base + d);
    const float s = dot * scale;
    p[k] = s;
    mx = fmaxf(mx, s);
  }
  mx = BlockReduce(c, mx, red, MaxOp{});
  float sum = 0.0f;
  for (int32_t k = tid; k < nk; k += N) {
    const float e = expf(p[k] - mx);
    p[k] = e;
    sum += e;
  }
  sum = BlockReduce(c, sum, red, SumOp{});
  const float inv = 1.0f / sum;
  for (int32_t k = tid; k < nk; k += N) p[k] *= inv;
}

// out[item.out_off + k] = sum over h = 0 .. qh-1 (in order) of the item's head rows.
template <class Ctx>
SP_ATTN_FN void LazyHeadSumBlock(Ctx& c, const LazyScoreItem item, int32_t qh,
                                 const float* head_rows, float* out) {
  const float* rows = head_rows + static_cast<size_t>(item.out_off) * qh;
  for (int32_t k = c.tid(); k < item.nk; k += c.nthreads()) {
    float s = 0.0f;
    for (int32_t h = 0; h < qh; ++h) s += rows[static_cast<size_t>(h) * item.nk + k];
    out[item.out_off + k] = s;
  }
}

}  // namespace superpose::cuda
