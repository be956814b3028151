// LoRA adapters on the CUDA backend: this rank's part of each adapter (engine::ShardLora)
// in bf16 device memory with a table of descriptors per (layer, site, module), and the
// per-step segment table (cuda/lora_segments.h) the segmented kernels
// (cuda/lora_kernels.cu) read. Internal to cuda/.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "cuda/cuda_util.h"
#include "cuda/lora_body.h"
#include "engine/lora_shard.h"

namespace superpose::cuda {

// One adapter on one device: A and B^T of every adapted module (bf16), and its
// descriptors [layer][site][slot] (rank 0 where a module is not adapted).
struct CudaLora {
  CudaLora() = default;
  CudaLora(const CudaLora&) = delete;
  CudaLora& operator=(const CudaLora&) = delete;
  ~CudaLora();  // frees on its device
  int32_t device = 0;
  DeviceArray<bf16> weights;
  DeviceArray<LoraDesc<bf16>> descs;
  int64_t bytes = 0;  // device bytes held
};

// Copies `lora` to `device` (waits for the copies; touches no stream of a backend).
absl::StatusOr<std::shared_ptr<const CudaLora>> UploadLora(const engine::ShardedLora& lora,
                                                           int32_t device);

// A backend rank's adapters and the scratch of its steps.
struct CudaLoraState {
  engine::LoraTable<CudaLora> table;  // thread-safe
  DeviceArray<float> u;               // [T, kLoraUWidth]: the shrink's output
};

}  // namespace superpose::cuda
