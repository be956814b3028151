// bfloat16-weight GEMM for the CPU backend: y = x * W^T with W stored as bf16 (half the
// bytes of float32, so decode, which streams every weight once per step, runs up to
// twice as fast) and the products accumulated in float32. On CPUs with AMX (Intel
// Sapphire Rapids and later) the tiles run on the matrix unit, whose throughput makes a
// step of 16-64 rows cost about what a single row costs: weight streaming, not
// arithmetic, is the limit. CPUs with AVX512-BF16 but no AMX (AMD Zen 4/5) use vdpbf16ps
// on the same packed layout; every other CPU (AVX2, SSE4, Arm NEON) widens the weights to
// float32 in registers and uses fused multiply-adds (engine/cpu/bf16_widen.h, Highway):
// the same bytes streamed, so decode gains the same ~2x over float32 weights.
//
// Activations are rounded to bf16 (round to nearest even) on the way in, as GPU bf16
// inference does, so every kernel multiplies the same operands (bf16 x bf16 products are
// exact in float32; kernels differ only in float32 accumulation). Each output element is
// computed by the same instruction sequence whatever the number of rows in the call, so a
// sequence's results never depend on its batch (continuous batching stays
// token-for-token equal to running alone).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace superpose::engine::cpu {

// W[out, in] packed for the kernels: bf16, zero-padded to multiples of 32 in both
// dimensions, in blocks of 32 output rows x 32 inputs (2 KiB contiguous; a row block's
// blocks follow each other, so a row block streams sequentially). A block is two AMX B
// tiles (output rows 0-15, then 16-31), each in the pair-interleaved layout: element
// (input pair p, output row n) = {W[n][2p], W[n][2p + 1]}.
class PackedBf16 {
 public:
  static constexpr int32_t kRows = 32;  // output rows per block
  static constexpr int32_t kK = 32;     // inputs per block
  PackedBf16() = default;
  // Packs float32 W[out, in], rounding to bf16.
  void Pack(const float* w, int32_t out, int32_t in);
  int32_t out() const { return out_; }
  int32_t in() const { return in_; }
  int32_t row_blocks() const { return (out_ + kRows - 1) / kRows; }
  int32_t k_blocks() const { return (in_ + kK - 1) / kK; }
  bool empty() const { return out_ == 0; }
  size_t bytes() const { return size_ * sizeof(uint16_t); }
  // Position of W[row r][input k] of a block within it.
  static constexpr int32_t Offset(int32_t r, int32_t k) {
    return (r / 16) * 16 * kK + ((k / 2) * 16 + r % 16) * 2 + k % 2;
  }
  // Block (row block rb, k block kb).
  const uint16_t* block(int32_t rb, int32_t kb) const {
    return data_.get() + (static_cast<size_t>(rb) * k_blocks() + kb) * kRows * kK;
  }
  // The weight as float (bf16 widened), row-major [out, in]: tests and references.
  void Unpack(float* w) const;

 private:
  struct Free {
    void operator()(uint16_t* p) const;
  };
  std::unique_ptr<uint16_t[], Free> data_;
  size_t size_ = 0;
  int32_t out_ = 0, in_ = 0;
};

// Cache lines that a kernel streaming W prefetches into L1 as it runs: per_step lines per
// block step (Step), from p up to end (bf16_gemm.cc, bf16_widen.cc). Kernels step a local
// copy, which their loops keep in registers.
struct PrefetchLines {
  const char* p = nullptr;
  const char* end = nullptr;
  int32_t per_step = 0;
  void Step() {
    for (int32_t i = 0; i < per_step && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 3);
  }
};
// For the one pass of a batch-1-sized step over row block rb: 4 blocks (8 KiB) ahead of
// the block being read, one block's lines per block step, running on into the next row
// block (usually the same thread's next) and never past W. The hardware prefetchers alone
// left AMD Zen 4 at half the memory bandwidth: bench/bf16_gemm_bench, 2 threads, 1 row, ms
// per 151 MB pass, none -> 2 / 4 / 8 blocks ahead: widen/AVX2 7.4-8.4 -> 3.7-4.4 / 3.3-3.7
// / 3.6-4.3, widen/AVX3 4.6-5.0 -> 3.4-4.4 / 3.9-5.0 / 3.3-4.2; avx512_bf16 6.1-7.1 ->
// 4.2-4.3 at 4. Prefill's passes re-read each row block from L2 and do not prefetch (it
// cost 15% at 512 rows on AVX2).
PrefetchLines PrefetchAhead(const PackedBf16& w, int32_t rb);
// For the passes over a group of blocks of row block rb that ends before block kb1: the
// next group of `group` blocks (the rest of this row block, else the start of the next),
// spread over `steps` block steps.
PrefetchLines PrefetchNextGroup(const PackedBf16& w, int32_t rb, int32_t kb1, int32_t group,
                                int32_t steps);

enum class Bf16Kernel {
  kAmx,         // AMX tiles (Intel Sapphire Rapids and later)
  kAvx512Bf16,  // vdpbf16ps (AMD Zen 4/5, Intel Cooper Lake): half the bytes, vector units
  kWiden,       // widen to float32 + FMA, Highway: every CPU (AVX2, SSE4, NEON, portable)
};

// y[rows, w.out()] = bf16(x[rows, w.in()]) * W^T with the best kernel of this CPU (one
// kernel per process, so results never depend on the batch). Threads (OpenMP) split the
// output rows.
void Bf16Gemm(const float* x, int32_t rows, const PackedBf16& w, float* y);
// A given kernel (kWiden when this CPU lacks it): tests, benchmarks.
void Bf16GemmWith(Bf16Kernel kernel, const float* x, int32_t rows, const PackedBf16& w, float* y);

// True when this CPU and OS run AMX bf16 tiles.
bool HasAmxBf16();
// True when this CPU has AVX512-BF16 (vdpbf16ps).
bool HasAvx512Bf16();
bool Bf16KernelAvailable(Bf16Kernel kernel);
const char* Bf16KernelName(Bf16Kernel kernel);  // "amx", "avx512_bf16", "widen"
// The kernel Bf16Gemm uses here: AMX or AVX512-BF16 when the CPU has them and the SIMD
// target (engine/simd.h) is not capped below AVX-512; kWiden otherwise.
Bf16Kernel BestBf16Kernel();
const char* Bf16GemmKernelName();

}  // namespace superpose::engine::cpu
