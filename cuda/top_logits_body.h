// The body of the compact-logits kernel (one CUDA block per logits row): the row's n
// best tokens (logit descending, lower id first on ties, as engine::SelectTopLogits)
// and its log-sum-exp, so that a decode step copies n (id, logit) pairs per row to the
// host instead of the whole vocabulary (128k floats = 512 KB a row for Llama 3).
// Written once for cuda/kernels.cu and tests/top_logits_emulation_test.cc (CPU threads,
// a barrier for sync()), like cuda/attention_body.h.
//
// Selection is a radix select on the logits' order-preserving 32-bit keys: four passes
// of 8 bits, each a shared-memory histogram of the tokens that match the bits fixed so
// far, find the key K of the n-th best token and how many tokens equal to K to take.
// A last pass over contiguous slices of the row (one per thread, so that a prefix sum
// over threads orders tokens by id) gathers the tokens above K and the first ones equal
// to K; n threads then place each candidate at its rank.
//
// Ctx: tid(), nthreads() (a power of two, at most kTopThreads), sync() (a block-wide
// barrier), atomic_add(uint32_t*, uint32_t).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda/attn_tile.h"
#include "cuda/block_reduce.h"
#include "engine/row_sampling.h"

namespace superpose::cuda {

constexpr int kTopThreads = 256;
constexpr int kTopMax = 64;  // engine::kMaxTopLogits

struct TopLogitsShared {
  uint32_t hist[256];
  uint32_t above[kTopThreads];  // per thread slice: tokens with key > K, then prefix sums
  uint32_t equal[kTopThreads];  // ... with key == K
  float red[kTopThreads];
  int32_t cand_id[kTopMax];
  float cand_logit[kTopMax];
  uint32_t key, above_k;  // RadixSelect's
};

// a comes before b.
SP_ATTN_FN bool TopBetter(float la, int32_t ia, float lb, int32_t ib) {
  return la > lb || (la == lb && ia < ib);
}

// x: one row of V logits; writes n (1 <= n <= min(V, kTopMax)) ids and logits and the
// row's log-sum-exp. Every thread of the block calls it.
template <class Ctx>
SP_ATTN_FN void TopLogitsRow(Ctx& c, const float* x, int32_t V, int32_t n, TopLogitsShared& sh,
                             int32_t* out_id, float* out_logit, float* out_lse) {
  const int tid = c.tid(), N = c.nthreads();

  // ---- Log-sum-exp: block max, then block sum of exp(x - max). ----
  float m = -INFINITY;
  for (int32_t i = tid; i < V; i += N) m = fmaxf(m, x[i]);
  const float mx = BlockReduce(c, m, sh.red, MaxOp());
  float sum = 0.0f;
  for (int32_t i = tid; i < V; i += N) sum += expf(x[i] - mx);
  sum = BlockReduce(c, sum, sh.red, SumOp());
  if (tid == 0) *out_lse = mx + logf(sum);

  // ---- Radix select: the key K of the n-th best token. ----
  uint32_t take_above = 0;  // tokens with key > K: all taken
  const uint32_t K = RadixSelect(
      c, x, V, static_cast<uint32_t>(n), [](int32_t) { return 1u; }, sh.hist, &sh.above_k, &sh.key,
      &take_above);
  const uint32_t take_equal = static_cast<uint32_t>(n) - take_above;  // >= 1

  // ---- Gather, in id order: every token above K, the first take_equal equal to K. ----
  const int32_t slice = (V + N - 1) / N;
  const int32_t begin = tid * slice < V ? tid * slice : V;
  const int32_t end = begin + slice < V ? begin + slice : V;
  uint32_t na = 0, ne = 0;
  for (int32_t i = begin; i < end; ++i) {
    const uint32_t k = engine::RankKey(x[i]);
    na += k > K;
    ne += k == K;
  }
  sh.above[tid] = na;
  sh.equal[tid] = ne;
  c.sync();
  if (tid == 0) {  // exclusive prefix sums over the slices
    uint32_t a = 0, e = 0;
    for (int t = 0; t < N; ++t) {
      const uint32_t ta = sh.above[t], te = sh.equal[t];
      sh.above[t] = a;
      sh.equal[t] = e;
      a += ta;
      e += te;
    }
  }
  c.sync();
  uint32_t pa = sh.above[tid], pe = sh.equal[tid];
  for (int32_t i = begin; i < end && (pa < take_above || pe < take_equal); ++i) {
    const uint32_t k = engine::RankKey(x[i]);
    uint32_t slot = kTopMax;
    if (k > K) {
      slot = pa++;
    } else if (k == K) {
      if (pe < take_equal) slot = take_above + pe;
      ++pe;
    }
    if (slot < static_cast<uint32_t>(kTopMax)) {
      sh.cand_id[slot] = i;
      sh.cand_logit[slot] = x[i];
    }
  }
  c.sync();

  // ---- Each candidate to its rank. ----
  if (tid < n) {
    const float l = sh.cand_logit[tid];
    const int32_t id = sh.cand_id[tid];
    int32_t rank = 0;
    for (int32_t j = 0; j < n; ++j) {
      rank += TopBetter(sh.cand_logit[j], sh.cand_id[j], l, id);
    }
    out_id[rank] = id;
    out_logit[rank] = l;
  }
}

}  // namespace superpose::cuda
