// Reads one tensor-parallel rank's projections as QuantMatrix (engine/cpu/quant_gemm.h),
// in the layout the CPU backend computes with (ShardedWeightReader's: q, k, v rows fused,
// gate then up rows fused; o and down split by input columns). The tensors come from a
// quantized checkpoint (<base>.qweight, ...) or, for a float checkpoint with the load-time
// option (--cpu_dtype=int8|q4), are quantized here from the whole tensor with the
// converter's own ReadAndQuantize: both give the same codes.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace superpose::engine::cpu {

class QuantWeightReader {
 public:
  // `kind` kInt8 or kQ4. The referenced objects must outlive the reader.
  QuantWeightReader(const ModelConfig& config, const WeightSource& weights, const Shard& shard,
                    const ShardLayout& layout, WeightQuant kind);

  absl::Status Qkv(int32_t l, QuantMatrix* m) const;     // [qkv_rows, hidden]
  absl::Status O(int32_t l, QuantMatrix* m) const;       // [hidden, q_heads * head_dim]
  absl::Status GateUp(int32_t l, QuantMatrix* m) const;  // [2 * inter, hidden]
  absl::Status Down(int32_t l, QuantMatrix* m) const;    // [hidden, inter]
  // The untied LM head: this rank's vocabulary rows, then zero rows up to vocab_pad.
  absl::Status LmHead(QuantMatrix* m) const;

 private:
  // The whole tensor `<base>.weight` [rows, cols], quantized.
  absl::StatusOr<QuantizedTensor> Get(const std::string& base, int64_t rows, int64_t cols) const;
  absl::Status Block(const std::string& base, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                     int64_t c0, int64_t c1, QuantMatrix* m) const;
  // The checkpoint tensor of layer l (of the layer whose weights it shares, if any).
  std::string LayerName(int32_t l, const char* tensor) const;

  const ModelConfig* config_;
  const WeightSource* weights_;
  ShardLayout layout_;
  WeightQuant kind_;
  int64_t q0_ = 0, q1_ = 0, k0_ = 0, k1_ = 0, i0_ = 0, i1_ = 0;
};

}  // namespace superpose::engine::cpu
