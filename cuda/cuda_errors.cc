#include "cuda/cuda_errors.h"

#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend_impl.h"
#include "spdlog/spdlog.h"

namespace superpose::cuda {

bool IsStickyCudaError(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchTimeout:
    case cudaErrorContextIsDestroyed:
    case cudaErrorAssert:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorLaunchFailure:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorExternalDevice:
      return true;
    default:
      return false;
  }
}

cudaError_t CudaErrorOf(const absl::Status& st) {
  const auto payload = st.GetPayload(kCudaErrorPayload);
  int code = 0;
  if (!payload.has_value() || !absl::SimpleAtoi(std::string(*payload), &code)) return cudaSuccess;
  return static_cast<cudaError_t>(code);
}

void CudaBackend::Impl::NoteFailure(const absl::Status& st) {
  cudaError_t e = CudaErrorOf(st);
  absl::Status cause = st;
  if (!IsStickyCudaError(e)) {
    // The failure may be a cuBLAS or NCCL error, or a copy's, behind which a kernel's
    // sticky error hides: ask the device (a sticky error fails every call).
    int prev = -1;
    cudaGetDevice(&prev);
    cudaSetDevice(device);
    const cudaError_t probe = stream != nullptr ? cudaStreamQuery(stream) : cudaDeviceSynchronize();
    if (IsStickyCudaError(probe)) {
      e = probe;
      cause = CudaStatus(probe, "cudaStreamQuery after a failed call", __FILE__, __LINE__);
    } else {
      cudaGetLastError();  // a non-sticky error must not fail the next call
    }
    if (prev >= 0) cudaSetDevice(prev);
  }
  if (!IsStickyCudaError(e)) return;
  absl::MutexLock lock(&health_mu);
  if (!sticky.ok()) return;
  sticky = cause;
  spdlog::critical("CUDA device {}: sticky error, the backend cannot run steps any more: {}",
                   device, cause.ToString());
}

absl::Status CudaBackend::Impl::Health() const {
  absl::MutexLock lock(&health_mu);
  if (sticky.ok()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("CUDA device ", device,
                   " hit a sticky error (the process must restart): ", sticky.message()));
}

}  // namespace superpose::cuda
