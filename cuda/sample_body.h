// The body of the row-sampling kernel (one CUDA block per logits row): the exponential
// race of engine/row_sampling.h on the device, so that a temperature request's row never
// leaves the GPU (a decode step copies one token per row instead of the vocabulary).
// Written once for cuda/kernels.cu and tests/sample_emulation_test.cc (CPU threads, a
// barrier for sync()), like cuda/top_logits_body.h.
//
// Block max; with top_p < 1 the total fixed-point mass of the candidates (block sum of
// integers: exact), then a radix select over the logits' rank keys, four 8-bit passes
// of shared-memory histograms of fixed-point mass, finds the key K of the last kept
// token; a pass over one contiguous slice per thread with a prefix sum over threads
// finds, among the tokens with key K in id order, the one whose mass completes top_p.
// Then every thread races its tokens and a block reduction keeps the best (lower id on
// ties).
//
// Ctx: tid(), nthreads() (a power of two, at most kSampleThreads), sync(),
// atomic_add(unsigned long long*, unsigned long long).
#pragma once

#include <math.h>
#include <stdint.h>

#include "cuda/attn_tile.h"
#include "cuda/block_reduce.h"
#include "engine/row_sampling.h"

namespace superpose::cuda {

constexpr int kSampleThreads = 256;

struct SampleShared {
  unsigned long long hist[256];
  unsigned long long sum[kSampleThreads];  // per thread, then reductions / prefix sums
  float score[kSampleThreads];
  int32_t id[kSampleThreads];
  uint32_t key;              // RadixSelect's
  unsigned long long above;  // RadixSelect's
  int32_t last_equal;        // the last kept token with key K
};

// x: one row of V logits; writes the drawn token and its logit. Every thread calls it.
template <class Ctx>
SP_ATTN_FN void SampleRowBlock(Ctx& c, const float* x, int32_t V, const engine::RowSampling& s,
                               SampleShared& sh, int32_t* out_token, float* out_logit) {
  const int tid = c.tid(), N = c.nthreads();
  const float inv_t = 1.0f / s.temperature;

  // ---- Block max. ----
  float m = -INFINITY;
  for (int32_t i = tid; i < V; i += N) m = fmaxf(m, x[i]);
  const float mx = BlockReduce(c, m, sh.score, MaxOp()) * inv_t;

  // ---- top-p: the key K of the last kept token and the last kept id with key K. ----
  const bool cut = s.top_p < 1.0f;
  uint32_t K = 0;
  int32_t last_equal = V;
  if (cut) {
    unsigned long long total = 0;
    for (int32_t i = tid; i < V; i += N) {
      const float w = engine::SpExp(engine::ScaledLogit(x[i], inv_t, mx));
      if (w >= s.min_p) total += engine::FixedMass(w);
    }
    total = BlockReduce(c, total, sh.sum, SumOp());
    const unsigned long long target = engine::TopPTarget(s.top_p, total);
    unsigned long long above = 0;  // mass of the candidates with key > K
    K = RadixSelect(
        c, x, V, target,
        [&](int32_t i) -> unsigned long long {
          const float w = engine::SpExp(engine::ScaledLogit(x[i], inv_t, mx));
          return w >= s.min_p ? engine::FixedMass(w) : 0ull;
        },
        sh.hist, &sh.above, &sh.key, &above);

    // Tokens with key K, in id order: one contiguous slice per thread.
    const int32_t slice = (V + N - 1) / N;
    const int32_t begin = tid * slice < V ? tid * slice : V;
    const int32_t end = begin + slice < V ? begin + slice : V;
    unsigned long long mine = 0;
    for (int32_t i = begin; i < end; ++i) {
      if (engine::RankKey(x[i]) != K) continue;
      const float w = engine::SpExp(engine::ScaledLogit(x[i], inv_t, mx));
      if (w >= s.min_p) mine += engine::FixedMass(w);
    }
    sh.sum[tid] = mine;
    if (tid == 0) sh.last_equal = V;
    c.sync();
    if (tid == 0) {  // exclusive prefix sums over the slices
      unsigned long long acc = 0;
      for (int t = 0; t < N; ++t) {
        const unsigned long long v = sh.sum[t];
        sh.sum[t] = acc;
        acc += v;
      }
    }
    c.sync();
    unsigned long long cum = above + sh.sum[tid];
    if (cum < target) {
      for (int32_t i = begin; i < end; ++i) {
        if (engine::RankKey(x[i]) != K) continue;
        const float w = engine::SpExp(engine::ScaledLogit(x[i], inv_t, mx));
        if (w < s.min_p) continue;
        cum += engine::FixedMass(w);
        if (cum >= target) {
          sh.last_equal = i;  // one thread only: the prefix sums cross the target once
          break;
        }
      }
    }
    c.sync();
    last_equal = sh.last_equal;
  }

  // ---- The race. ----
  float best = -INFINITY;
  int32_t best_id = 0x7FFFFFFF;
  for (int32_t i = tid; i < V; i += N) {
    const float z = engine::ScaledLogit(x[i], inv_t, mx);
    if (engine::SpExp(z) < s.min_p) continue;
    if (cut) {
      const uint32_t k = engine::RankKey(x[i]);
      if (k < K || (k == K && i > last_equal)) continue;
    }
    const float score = z + engine::RaceNoise(s.seed, s.draw, i);
    if (score > best || (score == best && i < best_id)) {
      best = score;
      best_id = i;
    }
  }
  sh.score[tid] = best;
  sh.id[tid] = best_id;
  c.sync();
  for (int k = N / 2; k > 0; k >>= 1) {
    if (tid < k) {
      const float o = sh.score[tid + k];
      const int32_t oid = sh.id[tid + k];
      if (o > sh.score[tid] || (o == sh.score[tid] && oid < sh.id[tid])) {
        sh.score[tid] = o;
        sh.id[tid] = oid;
      }
    }
    c.sync();
  }
  if (tid == 0) {
    *out_token = sh.id[0];
    *out_logit = x[sh.id[0]];
  }
}

}  // namespace superpose::cuda
