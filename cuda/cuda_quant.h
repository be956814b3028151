// The CUDA backend's quantized projections (--cuda_dtype=int8|q4, issue 17 item 2): the
// device copy of a rank's engine::cpu::QuantMatrix (read and sharded by
// engine::cpu::QuantWeightReader, exactly as the CPU backend's: q/k/v and gate/up split
// by output rows, o and down by input columns, a q4 rank's column range on a 16-column
// group boundary) and the projection y = x * W'^T on it (cuda/quant_kernels.h).
// Internal to cuda/.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cuda/cuda_options.h"
#include "cuda/cuda_util.h"
#include "cuda/quant_kernels.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/model/config.h"

namespace superpose::cuda {

// A quantized W[out, in] in device memory, in QuantMatrix's layout with the tables as
// float16 bits ([sets, groups, 16]). kind 0: the matrix is not quantized (bf16).
struct DeviceQuant {
  int32_t kind = 0;  // 0, kQuantInt8 or kQuantQ4
  int32_t out = 0, in = 0;
  DeviceArray<uint8_t> codes;
  DeviceArray<float> scales;     // int8: [out]
  DeviceArray<uint16_t> lut;     // q4: [sets, groups, 16]
  DeviceArray<int32_t> lut_set;  // q4: [out]

  bool empty() const { return kind == 0; }
  QuantView view() const;
  int64_t bytes() const;
  // Device arrays for a W[out, in] of `kind` with `sets` table sets (contents undefined).
  absl::Status Allocate(int32_t kind, int32_t out, int32_t in, int32_t sets);
};

// Copies m to the device (synchronous copies from pageable memory).
absl::Status UploadQuant(const engine::cpu::QuantMatrix& m, DeviceQuant* dst);

// Random codes, scales scale / 127 and tables uniform(-scale, scale) (benchmarks).
absl::Status FillRandomQuant(DeviceQuant& w, uint64_t seed, float scale, cudaStream_t stream);

// y[T, w.out] = x[T, w.in] * W'^T, queued on `stream` (the cuBLAS handle's): the
// streaming kernel for T <= kQuantStreamMaxT, else W' expanded to bf16 in `scratch`
// (`scratch_elems` elements, at least w.in) as many rows at a time as fit, each chunk
// multiplied by cuBLAS. Launch parameters depend on T and the shapes only.
absl::Status QuantProject(cublasHandle_t handle, cudaStream_t stream, const bf16* x, int32_t T,
                          const DeviceQuant& w, bf16* scratch, size_t scratch_elems, float* y);

// The projections' format for a load: --cuda_dtype against the checkpoint's stored
// quantization (kNone: bf16). INVALID_ARGUMENT naming the flag for int8 asked of a q4
// checkpoint or the reverse.
absl::StatusOr<engine::WeightQuant> ChooseCudaQuant(CudaDType dtype, engine::WeightQuant stored);

}  // namespace superpose::cuda
