// The bodies of the segmented LoRA kernels (SGMV, as S-LoRA and Punica batch many
// adapters): after a fused base projection y = x W^T of a step's T rows, each segment
// (consecutive rows that share one adapter) adds its adapter's term
//   u = x A^T  [rows, rank]                        (shrink)
//   y[:, offset : offset + out] += scale * u B^T   (expand)
// for every adapted module of the site (q, k, v for qkv; gate, up for gate_up; o; down).
// One launch of each covers every segment: shrink block (segment, slot), expand block
// (segment, slot, column tile). Written once for cuda/lora_kernels.cu and for
// tests/lora_emulation_test.cc, which runs them on CPU threads. Plain C++ apart from
// SP_ATTN_FN.
//
// Each row's arithmetic is fixed by the adapter's shapes and the block size alone (the
// same partial sums in the same order wherever the row sits in the step), so a
// sequence's LoRA term does not depend on the other sequences of its step.
//
// Ctx: tid(), nthreads(), sync() (a block-wide barrier), load(const T*, i) -> float.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "cuda/attn_tile.h"

namespace superpose::cuda {

// Sites per layer, adapted modules per site and the largest rank (engine/lora_shard.h's
// kNumLoraSites, kMaxLoraSiteProjs and engine/lora_adapter.h's kMaxLoraRank; nvcc
// compiles the kernels without the engine headers, cuda/cuda_lora.cc checks them).
constexpr int32_t kLoraSites = 4;
constexpr int32_t kLoraSlots = 3;
constexpr int32_t kLoraMaxRank = 64;
// Floats of u per row: every slot's rank values.
constexpr int32_t kLoraUWidth = kLoraSlots * kLoraMaxRank;
constexpr int kLoraThreads = 256;  // >= kLoraMaxRank
// A segment: row_begin, row_end, then the 64-bit address of its adapter's descriptors
// (low word, high word). At most kLoraSegmentRows rows, so that long prefills spread.
constexpr int32_t kLoraSegmentWords = 4;
constexpr int32_t kLoraSegmentRows = 16;

// One adapted module of one layer on this rank; rank 0: none.
template <class W>
struct LoraDesc {
  const W* a = nullptr;   // [rank, in]
  const W* bt = nullptr;  // B transposed: [rank, out]
  int32_t rank = 0, in = 0, out = 0, offset = 0;
  float scale = 0.0f;
  int32_t pad = 0;
};

// An adapter's descriptors: [layer][site][slot].
SP_ATTN_FN size_t LoraDescIndex(int32_t layer, int32_t site, int32_t slot) {
  return (static_cast<size_t>(layer) * kLoraSites + site) * kLoraSlots + slot;
}

template <class W>
SP_ATTN_FN const LoraDesc<W>* LoraSegmentDesc(const int32_t* seg, int32_t layer, int32_t site,
                                              int32_t slot) {
  const uint64_t bits =
      (static_cast<uint64_t>(static_cast<uint32_t>(seg[3])) << 32) | static_cast<uint32_t>(seg[2]);
  return reinterpret_cast<const LoraDesc<W>*>(static_cast<uintptr_t>(bits)) +
         LoraDescIndex(layer, site, slot);
}

// Shrink, one block: u[row, slot * kLoraMaxRank + k] = sum_i x[row, i] A[k, i] for the
// segment's rows. Thread t computes the partial sum over i = p, p + P, ... of k = t / P
// (P = nthreads / rank lanes per k, so that a warp reads consecutive elements), and
// thread k adds the P partials of k in order. smem: nthreads() floats.
template <class W, class Ctx, class X>
SP_ATTN_FN void LoraShrinkBlock(Ctx& c, const int32_t* seg, int32_t layer, int32_t site,
                                int32_t slot, const X* x, int32_t x_width, float* smem, float* u) {
  const LoraDesc<W>* d = LoraSegmentDesc<W>(seg, layer, site, slot);
  const int32_t r = d->rank;
  if (r == 0) return;  // the whole block leaves
  const int32_t P = c.nthreads() / r, t = c.tid();
  const int32_t k = t / P, p = t % P;
  for (int32_t row = seg[0]; row < seg[1]; ++row) {
    if (k < r) {
      const X* xr = x + static_cast<size_t>(row) * x_width;
      const W* ak = d->a + static_cast<size_t>(k) * d->in;
      float acc = 0.0f;
      for (int32_t i = p; i < d->in; i += P) acc += c.load(xr, i) * c.load(ak, i);
      smem[k * P + p] = acc;
    }
    c.sync();
    if (t < r) {
      float s = 0.0f;
      for (int32_t q = 0; q < P; ++q) s += smem[t * P + q];
      u[static_cast<size_t>(row) * kLoraUWidth + slot * kLoraMaxRank + t] = s;
    }
    c.sync();
  }
}

// Expand, one block: columns [tile * nthreads, (tile + 1) * nthreads) of the slot's
// module, y[row, offset + j] += scale * sum_k u[row, slot * kLoraMaxRank + k] Bt[k, j]
// (k in order) for the segment's rows. Modules of one site write disjoint columns,
// segments disjoint rows: no two threads write one element.
template <class W, class Ctx>
SP_ATTN_FN void LoraExpandBlock(Ctx& c, const int32_t* seg, int32_t layer, int32_t site,
                                int32_t slot, int32_t tile, const float* u, float* y,
                                int32_t y_width) {
  const LoraDesc<W>* d = LoraSegmentDesc<W>(seg, layer, site, slot);
  const int32_t j = tile * c.nthreads() + c.tid();
  if (d->rank == 0 || j >= d->out) return;
  for (int32_t row = seg[0]; row < seg[1]; ++row) {
    const float* ur = u + static_cast<size_t>(row) * kLoraUWidth + slot * kLoraMaxRank;
    float acc = 0.0f;
    for (int32_t k = 0; k < d->rank; ++k) {
      acc += ur[k] * c.load(d->bt, static_cast<size_t>(k) * d->out + j);
    }
    y[static_cast<size_t>(row) * y_width + d->offset + j] += d->scale * acc;
  }
}

}  // namespace superpose::cuda
