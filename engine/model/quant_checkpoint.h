// superpose-quantize's library half: reads a float Hugging Face model directory (as the
// loader reads it: config.json, model.safetensors or a sharded index) and writes a new
// directory whose projections are stored int8 or q4 (engine/model/quantize.h) in one
// model.safetensors, with config.json's "quantization_config" block, and every other
// file (tokenizer, generation config, chat template) copied.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/quantize.h"
#include "engine/model/weights.h"

namespace superpose::engine {

struct QuantizeSummary {
  int64_t quantized_tensors = 0;  // projections converted
  int64_t copied_tensors = 0;     // everything else, as stored
  int64_t bytes_written = 0;      // of model.safetensors
};

// `kind` kInt8 or kQ4. `dst_dir` is created when missing; it must not be `src_dir`.
// INVALID_ARGUMENT naming the file and field for a checkpoint that is already quantized,
// a projection with non-finite values or of an unexpected shape.
absl::StatusOr<QuantizeSummary> QuantizeCheckpoint(const std::string& src_dir,
                                                   const std::string& dst_dir, WeightQuant kind);

// Reads the float tensor `name` of shape [rows, cols] and quantizes it (`kind` kInt8 or
// kQ4): the converter and the CPU backend's load-time quantization share it, so both
// give the same codes. INVALID_ARGUMENT naming the tensor for non-finite values.
absl::StatusOr<QuantizedTensor> ReadAndQuantize(const WeightSource& weights,
                                                const std::string& name, WeightQuant kind,
                                                int64_t rows, int64_t cols);

}  // namespace superpose::engine
