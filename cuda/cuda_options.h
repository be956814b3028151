// The CUDA backend's own options (flags --cuda_attention, --cuda_graphs,
// --cuda_split_decode, --cuda_row_sampling, --cuda_dtype, --kv_cache_dtype), typed, and
// their parser.
// No CUDA includes. The options every backend takes are engine::BackendOptions.
#pragma once

#include "absl/status/statusor.h"
#include "engine/backend.h"

namespace superpose::cuda {

// Attention kernel of prefill steps (--cuda_attention). kAuto: tensor cores when
// head_dim is a multiple of 16 up to 128 (and the group fits), else the float32 SIMT
// kernel; kTensorCore where unsupported fails Load.
enum class CudaAttention { kAuto, kSimt, kTensorCore };

// Projection weights in device memory (--cuda_dtype). kAuto: the checkpoint's
// quantization (int8 / q4) for a quantized checkpoint, else bf16. kInt8 / kQ4: weight-only
// quantization at load of a float checkpoint (engine/model/quantize.h, the same codes as
// superpose-quantize), or of the checkpoint's own format. kBf16: a quantized checkpoint
// is dequantized to bf16 at load. Quantized weights run cuda/quant_kernels.h.
enum class CudaDType { kAuto, kBf16, kInt8, kQ4 };

struct CudaOptions {
  CudaAttention attention = CudaAttention::kAuto;
  // Replay decode steps (every sequence one new token) from captured CUDA graphs, one per
  // batch size up to 64; tp = 1 only. Results equal graphs off bitwise.
  bool graphs = true;
  // Decode steps with fewer (sequence, kv head) pairs than the GPU has SMs split each
  // context over up to 16 blocks of at least 256 keys (split-K attention) and merge
  // them; the split count depends on the batch size only, so graphs and eager steps stay
  // bitwise equal.
  bool split_decode = true;
  // Rows of temperature requests without top-k or penalties are drawn on the GPU
  // (engine/row_sampling.h) instead of copying the whole row to the host.
  bool row_sampling = true;
  CudaDType dtype = CudaDType::kAuto;
};

// Parses "cuda_attention" (auto, simt, tensor_core), "cuda_graphs", "cuda_split_decode",
// "cuda_row_sampling" (true, false), "cuda_dtype" (auto, bf16 or bfloat16, int8, q4) and
// "kv_cache_dtype" (auto, bfloat16: the KV cache is bfloat16 only). INVALID_ARGUMENT naming the
// flag for a bad or unsupported value or a flag of another backend.
absl::StatusOr<CudaOptions> ParseCudaOptions(const engine::BackendFlags& flags);

}  // namespace superpose::cuda
