// The CPU backend's quantized weights (engine/model/quantize.h: int8 per output channel,
// q4 palettized) and their dequantizing GEMM. QuantGemm streams the codes once per call:
// each thread expands a chunk of weight rows to float32 in a cache-resident buffer (Highway
// SIMD, runtime dispatch) and runs every activation row past it with SmallBatchGemm's own
// register tiles (SmallGemmPanel). So an output element is exactly what SmallBatchGemm
// computes on the dequantized matrix, whatever the row count, the row's place in the call
// or the thread count: quantized sequences keep the engine's batch invariance.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "engine/model/quantize.h"

namespace superpose::engine::cpu {

// W[out, in] quantized. Rows may come from several checkpoint tensors (the backend fuses
// q/k/v and gate/up): an int8 row carries its own scale; a q4 row names the table set of
// the tensor it came from (lut_set).
struct QuantMatrix {
  WeightQuant kind = WeightQuant::kNone;
  int32_t out = 0, in = 0;
  std::vector<uint8_t> codes;    // [out, row_bytes()] (QuantizedTensor's layout)
  std::vector<float> scales;     // int8: [out]
  std::vector<float> lut;        // q4: [sets, Q4Groups(in), 16], float16 values widened
  std::vector<int32_t> lut_set;  // q4: [out]

  bool empty() const { return kind == WeightQuant::kNone; }
  int64_t row_bytes() const { return kind == WeightQuant::kQ4 ? Q4RowBytes(in) : in; }
  // Bytes streamed per call (codes, scales and tables).
  int64_t bytes() const;
  // Appends rows [r0, r1) x columns [c0, c1) of t (a tensor-parallel rank's block). Every
  // block of one matrix has the same kind and width; a q4 block starts at a multiple of 16
  // columns and ends at one or at t.cols (INVALID_ARGUMENT otherwise).
  absl::Status AppendBlock(const QuantizedTensor& t, int64_t r0, int64_t r1, int64_t c0,
                           int64_t c1);
};

// y[rows, w.out] = x[rows, w.in] * dequant(W)^T (see the banner). rows >= 0, any count.
void QuantGemm(const float* x, int32_t rows, const QuantMatrix& w, float* y);

// Rows [r0, r1) of W dequantized with the dispatched SIMD kernel into out (`ld` floats
// apart): the values QuantGemm multiplies by (tests compare them with DequantizeRows).
void DequantizeQuantRows(const QuantMatrix& w, int32_t r0, int32_t r1, float* out, int32_t ld);

// The Highway target the dequantization dispatches to now.
const char* QuantGemmKernelName();

}  // namespace superpose::engine::cpu
