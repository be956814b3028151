#include "cuda/nccl_communicator.h"

#include "absl/strings/str_cat.h"
#include "cuda/cuda_util.h"

namespace superpose::cuda {
namespace {

absl::Status NcclStatus(ncclResult_t r, const char* what) {
  return absl::InternalError(absl::StrCat("NCCL error ", ncclGetErrorString(r), " in ", what));
}

#define SP_NCCL_RETURN_IF_ERROR(expr)                                    \
  do {                                                                   \
    const ncclResult_t sp_nccl_r_ = (expr);                              \
    if (sp_nccl_r_ != ncclSuccess) return NcclStatus(sp_nccl_r_, #expr); \
  } while (0)

absl::Status AbortedStatus() {
  return absl::AbortedError("tensor-parallel group aborted: another rank's step failed");
}

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> NcclCommunicator::CreateGroup(
    const std::vector<int>& devices) {
  const int n = static_cast<int>(devices.size());
  if (n < 1) return absl::InvalidArgumentError("NCCL group of no devices");
  std::vector<ncclComm_t> comms(n, nullptr);
  SP_NCCL_RETURN_IF_ERROR(ncclCommInitAll(comms.data(), n, devices.data()));
  std::vector<std::unique_ptr<NcclCommunicator>> out;
  absl::Status st;
  for (int r = 0; r < n; ++r) {
    float* scratch = nullptr;
    cudaError_t e = cudaSetDevice(devices[r]);
    if (e == cudaSuccess) e = cudaMalloc(&scratch, sizeof(float));
    if (e != cudaSuccess) {
      st = CudaStatus(e, "NCCL group scratch", __FILE__, __LINE__);
      scratch = nullptr;
    }
    // Owns comms[r] from here on, also on error (the destructor destroys it).
    out.emplace_back(new NcclCommunicator(comms[r], r, n, devices[r], scratch));
  }
  if (!st.ok()) return st;
  return out;
}

NcclCommunicator::~NcclCommunicator() {
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device_);
  if (scratch_ != nullptr) cudaFree(scratch_);
  absl::MutexLock lock(&mu_);
  if (comm_ != nullptr) ncclCommDestroy(comm_);
  if (prev >= 0) cudaSetDevice(prev);
}

void NcclCommunicator::Abort() {
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return;
  ncclCommAbort(comm_);
  comm_ = nullptr;
}

absl::Status NcclCommunicator::AllReduceSum(float* data, int64_t count) {
  if (count <= 0) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return AbortedStatus();
  SP_NCCL_RETURN_IF_ERROR(
      ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat, ncclSum, comm_, stream_));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllGather(const float* in, int64_t count, float* out) {
  if (count <= 0) return absl::OkStatus();
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return AbortedStatus();
  SP_NCCL_RETURN_IF_ERROR(
      ncclAllGather(in, out, static_cast<size_t>(count), ncclFloat, comm_, stream_));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Broadcast(float* data, int64_t count, int32_t root) {
  if (count <= 0) return absl::OkStatus();
  if (root < 0 || root >= size_) return absl::InvalidArgumentError("broadcast root out of range");
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return AbortedStatus();
  SP_NCCL_RETURN_IF_ERROR(
      ncclBroadcast(data, data, static_cast<size_t>(count), ncclFloat, root, comm_, stream_));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Barrier() {
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  {
    absl::MutexLock lock(&mu_);
    if (comm_ == nullptr) return AbortedStatus();
    SP_NCCL_RETURN_IF_ERROR(
        ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_));
  }
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  absl::MutexLock lock(&mu_);
  if (comm_ == nullptr) return AbortedStatus();  // the sync returned because of an abort
  return absl::OkStatus();
}

}  // namespace superpose::cuda
