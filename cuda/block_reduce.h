// Block-wide reductions and selection for the kernel bodies (cuda/*_body.h), written against their
// Ctx (tid(), nthreads() a power of two, sync()) so that they run on the GPU and in the CPU
// emulation tests alike.
#pragma once

#include <stdint.h>

#include "cuda/attn_tile.h"
#include "engine/row_sampling.h"

namespace superpose::cuda {

// Every thread passes its value; every thread gets op over all of them (a tree in
// `scratch`, nthreads() elements, which is free again when this returns).
template <class Ctx, class T, class Op>
SP_ATTN_FN T BlockReduce(Ctx& c, T v, T* scratch, Op op) {
  const int tid = c.tid();
  scratch[tid] = v;
  c.sync();
  for (int k = c.nthreads() / 2; k > 0; k >>= 1) {
    if (tid < k) scratch[tid] = op(scratch[tid], scratch[tid + k]);
    c.sync();
  }
  const T r = scratch[0];
  c.sync();
  return r;
}

struct MaxOp {
  template <class T>
  SP_ATTN_HD T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <class T>
  SP_ATTN_HD T operator()(T a, T b) const {
    return a + b;
  }
};

// Radix select over the rank keys (engine::RankKey) of row x[0..V): the key K with
// weight(keys > K) < target <= weight(keys >= K), where weight(i) is token i's weight
// (0 for a token that does not count); *above gets weight(keys > K). Four passes of
// 8 bits, each a shared-memory histogram (hist: 256 W) of the weights of the tokens that
// match the bits fixed so far. Needs target <= the total weight.
template <class Ctx, class W, class Weight>
SP_ATTN_FN uint32_t RadixSelect(Ctx& c, const float* x, int32_t V, W target, Weight weight, W* hist,
                                W* shared_above, uint32_t* shared_key, W* above) {
  const int tid = c.tid(), N = c.nthreads();
  if (tid == 0) {
    *shared_key = 0;
    *shared_above = 0;
  }
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += N) hist[b] = 0;
    c.sync();
    const uint32_t key = *shared_key;
    for (int32_t i = tid; i < V; i += N) {
      const uint32_t k = engine::RankKey(x[i]);
      if ((k & mask) != key) continue;
      const W w = weight(i);
      if (w != 0) c.atomic_add(&hist[(k >> shift) & 0xFF], w);
    }
    c.sync();
    if (tid == 0) {
      int b = 255;
      for (; b > 0; --b) {  // the weight in play reaches the target: bucket 0 at the latest
        if (*shared_above + hist[b] >= target) break;
        *shared_above += hist[b];
      }
      *shared_key = key | (static_cast<uint32_t>(b) << shift);
    }
    mask |= 0xFFu << shift;
    c.sync();
  }
  *above = *shared_above;
  const uint32_t K = *shared_key;
  c.sync();  // every thread has read them before they are reused
  return K;
}

}  // namespace superpose::cuda
