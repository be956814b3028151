// The CPU backend's own options (flags --cpu_dtype, --kv_cache_dtype, --cpu_row_sampling),
// typed, and their parser. The options every backend takes are engine::BackendOptions.
#pragma once

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace superpose::engine::cpu {

// Weight type (--cpu_dtype). kAuto: the checkpoint's quantization (int8 / q4) for a
// quantized checkpoint, bfloat16 for bf16 checkpoints (on every CPU: AMX, AVX512-BF16 or
// the widening kernel), float32 otherwise. kInt8 / kQ4: weight-only quantization at load
// of a float checkpoint (engine/model/quantize.h; the same codes as superpose-quantize).
enum class WeightDType { kAuto, kFloat32, kBFloat16, kInt8, kQ4 };
// KV cache element type (--kv_cache_dtype). kAuto: bfloat16 when the weights run in
// bfloat16, float32 otherwise.
enum class KvCacheDType { kAuto, kFloat32, kBFloat16 };

struct CpuOptions {
  WeightDType dtype = WeightDType::kAuto;
  KvCacheDType kv_cache_dtype = KvCacheDType::kAuto;
  // Rows of temperature requests without top-k or penalties are drawn by the backend
  // (engine/row_sampling.h) instead of by the engine's host sampler; as fast either way
  // on the CPU, so off unless asked (tests use it).
  bool row_sampling = false;
};

// Parses the flags "cpu_dtype" (auto, float32, bfloat16, int8, q4), "kv_cache_dtype" (auto,
// float32, bfloat16) and "cpu_row_sampling" (true, false). INVALID_ARGUMENT naming the
// flag for a bad value or a flag of another backend.
absl::StatusOr<CpuOptions> ParseCpuOptions(const BackendFlags& flags);

}  // namespace superpose::engine::cpu
