// Weight-only quantization of the projection matrices (issue 17 item 2; papers.md 3.4,
// 3.8): the two formats, their quantizers (used by superpose-quantize and by the CPU
// backend's load-time --cpu_dtype=int8|q4) and the one definition of their dequantized
// values, which every kernel reproduces exactly.
//
// int8: symmetric, one float32 scale per output row: scale = max|w_row| / 127,
//   code = round-half-even(w / scale) in [-127, 127], w' = float(code) * scale.
// q4 (AFM-style palettization, papers.md 3.8 PROPOSAL): the input dimension is cut into
//   groups of 16 consecutive columns (the last one shorter when cols % 16 != 0); each
//   group, over all the rows of the projection, shares one 16-entry look-up table stored
//   as float16; each weight is a 4-bit index into its group's table, w' = lut[index].
//   The table is fit by 1-D k-means on the group's values: initialised at the quantiles
//   (i + 0.5) / 16 of the sorted values, kQ4KMeansIterations Lloyd iterations (exact
//   assignments by midpoints over the sorted values, means from prefix sums in double),
//   then rounded to float16, and each weight takes its nearest float16 entry (the lower
//   index on a tie). No random numbers are drawn: conversion is reproducible bit for bit.
//
// Checkpoint layout: a projection `<base>.weight` [rows, cols] is replaced by
//   `<base>.qweight`  I8 [rows, cols] (int8) or U8 [rows, Q4RowBytes(cols)] (q4: per row
//                     and group 8 bytes, byte j holding column 16g + j in its low nibble
//                     and column 16g + 8 + j in its high nibble; zeros past cols),
//   `<base>.scales`   F32 [rows] (int8),
//   `<base>.lut`      F16 [Q4Groups(cols), 16] (q4),
// and config.json carries {"quantization_config": {"quant_method": "superpose",
// "weights": "int8" | "q4", ...}} (ReadQuantizationConfig).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace superpose::engine {

constexpr int32_t kQ4GroupSize = 16;  // input columns sharing one table
constexpr int32_t kQ4Levels = 16;     // table entries (4-bit indices)
constexpr int32_t kQ4KMeansIterations = 24;
constexpr int32_t kInt8MaxCode = 127;

inline int64_t Q4Groups(int64_t cols) { return (cols + kQ4GroupSize - 1) / kQ4GroupSize; }
inline int64_t Q4RowBytes(int64_t cols) { return Q4Groups(cols) * (kQ4GroupSize / 2); }

// "none", "int8", "q4".
const char* WeightQuantName(WeightQuant q);

// A quantized W[rows, cols] (layout above).
struct QuantizedTensor {
  WeightQuant kind = WeightQuant::kNone;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes;  // int8: [rows, cols] (int8 bits); q4: [rows, Q4RowBytes(cols)]
  std::vector<float> scales;   // int8: [rows]
  std::vector<uint16_t> lut;   // q4: [Q4Groups(cols), 16] float16 bits
  int64_t row_bytes() const { return kind == WeightQuant::kQ4 ? Q4RowBytes(cols) : cols; }
};

QuantizedTensor QuantizeInt8(const float* w, int64_t rows, int64_t cols);
QuantizedTensor PalettizeQ4(const float* w, int64_t rows, int64_t cols);
// kind kInt8 or kQ4.
QuantizedTensor Quantize(WeightQuant kind, const float* w, int64_t rows, int64_t cols);

// The 16-entry k-means table of `n` values (float32, before the float16 rounding).
std::vector<float> FitQ4Table(std::vector<float> values);
// Dequantized rows [r0, r1) of t, row-major [(r1 - r0), cols].
void DequantizeRows(const QuantizedTensor& t, int64_t r0, int64_t r1, float* out);

// True for the tensors superpose-quantize quantizes: the q/k/v/o and gate/up/down
// projections of every layer, and an untied lm_head ("<...>.weight" names).
bool IsQuantizableWeight(std::string_view name);
// "<base>.weight" -> "<base>".
std::string QuantBaseName(std::string_view weight_name);
// True when the checkpoint stores `<base>` quantized (has `<base>.qweight`).
bool HasQuantized(const WeightSource& weights, std::string_view base);
// Reads `<base>` of the expected shape [rows, cols] in the checkpoint's format `kind`;
// INVALID_ARGUMENT naming the tensor for a wrong dtype or shape.
absl::StatusOr<QuantizedTensor> ReadQuantized(const WeightSource& weights, const std::string& base,
                                              WeightQuant kind, int64_t rows, int64_t cols);
// Rows [r0, r1) x cols [c0, c1) of the quantized `<base>` [rows, cols], dequantized,
// row-major: how float readers (--cpu_dtype=float32|bfloat16, the CUDA backend) load a
// quantized checkpoint.
absl::Status ReadDequantizedBlock(const WeightSource& weights, const std::string& base,
                                  WeightQuant kind, int64_t rows, int64_t cols, int64_t r0,
                                  int64_t r1, int64_t c0, int64_t c1, float* out);

// config.json's optional "quantization_config": kNone when absent; INVALID_ARGUMENT naming
// the field for another quant_method or an unknown "weights".
absl::Status ReadQuantizationConfig(const nlohmann::json& config, const std::string& source,
                                    WeightQuant* out);
// The block superpose-quantize writes.
nlohmann::json QuantizationConfigJson(WeightQuant kind);

}  // namespace superpose::engine
