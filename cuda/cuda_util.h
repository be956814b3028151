// Internal helpers of the CUDA backend: error-to-Status macros, an owning device array,
// the bf16 GEMM. Not part of the public interface (cuda/cuda_backend.h).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "cuda/kernels.h"

namespace superpose::cuda {

// Payload of a CudaStatus: the cudaError_t, in decimal (CudaErrorOf, cuda/cuda_errors.h).
inline constexpr char kCudaErrorPayload[] = "superpose.cuda.error";

inline absl::Status CudaStatus(cudaError_t e, const char* what, const char* file, int line) {
  absl::Status st = absl::InternalError(absl::StrCat("CUDA error ", cudaGetErrorName(e), " (",
                                                     cudaGetErrorString(e), ") in ", what, " at ",
                                                     file, ":", line));
  st.SetPayload(kCudaErrorPayload, absl::Cord(absl::StrCat(static_cast<int>(e))));
  return st;
}

inline absl::Status CublasStatus(cublasStatus_t e, const char* what, const char* file, int line) {
  return absl::InternalError(absl::StrCat("cuBLAS error ", cublasGetStatusName(e), " (",
                                          cublasGetStatusString(e), ") in ", what, " at ", file,
                                          ":", line));
}

#define SP_CUDA_RETURN_IF_ERROR(expr)                                                \
  do {                                                                               \
    const cudaError_t sp_cuda_err_ = (expr);                                         \
    if (sp_cuda_err_ != cudaSuccess) {                                               \
      return ::superpose::cuda::CudaStatus(sp_cuda_err_, #expr, __FILE__, __LINE__); \
    }                                                                                \
  } while (0)

#define SP_CUBLAS_RETURN_IF_ERROR(expr)                                                  \
  do {                                                                                   \
    const cublasStatus_t sp_cublas_err_ = (expr);                                        \
    if (sp_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                       \
      return ::superpose::cuda::CublasStatus(sp_cublas_err_, #expr, __FILE__, __LINE__); \
    }                                                                                    \
  } while (0)

// Owns `size()` elements of T in device memory (cudaMalloc; never managed memory).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      Reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceArray() { Reset(); }

  // Exactly n elements; the old contents are dropped.
  absl::Status Allocate(size_t n) {
    Reset();
    if (n == 0) return absl::OkStatus();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, n * sizeof(T));
    if (e != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free allocation error
      return absl::ResourceExhaustedError(
          absl::StrCat("cudaMalloc of ", n * sizeof(T), " bytes failed: ", cudaGetErrorString(e)));
    }
    p_ = static_cast<T*>(p);
    n_ = n;
    return absl::OkStatus();
  }
  // At least n elements (grows by 1.5x, contents dropped when it grows).
  absl::Status Reserve(size_t n) {
    if (n <= n_) return absl::OkStatus();
    return Allocate(std::max(n, n_ + n_ / 2));
  }
  void Reset() {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// Page-locked host memory for asynchronous copies.
template <typename T>
class PinnedArray {
 public:
  PinnedArray() = default;
  PinnedArray(const PinnedArray&) = delete;
  PinnedArray& operator=(const PinnedArray&) = delete;
  ~PinnedArray() { Reset(); }
  absl::Status Reserve(size_t n) {
    if (n <= n_) return absl::OkStatus();
    Reset();
    const size_t want = std::max<size_t>(n, 4096);
    void* p = nullptr;
    const cudaError_t e = cudaMallocHost(&p, want * sizeof(T));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(absl::StrCat("cudaMallocHost of ", want * sizeof(T),
                                                       " bytes failed: ", cudaGetErrorString(e)));
    }
    p_ = static_cast<T*>(p);
    n_ = want;
    return absl::OkStatus();
  }
  void Reset() {
    if (p_ != nullptr) cudaFreeHost(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// y[rows, out] (float32) = x[rows, in] (bf16) * W[out, in]^T (bf16), row-major, with
// float32 accumulation (cublasGemmEx, CUBLAS_COMPUTE_32F), on the handle's stream.
absl::Status GemmBf16(cublasHandle_t handle, const bf16* x, int32_t rows, int32_t in, const bf16* w,
                      int32_t out, float* y);

// Rounds float32 to bf16 (nearest even) on the host and copies n values to `dst`.
absl::Status UploadBf16(const float* src, size_t n, bf16* dst);

}  // namespace superpose::cuda
