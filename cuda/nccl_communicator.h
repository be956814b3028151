// The GPU Communicator: NCCL among the GPUs of one node, one communicator per rank
// (ncclCommInitAll), each rank driven by its own thread (TensorParallelBackend).
//
// Unlike the CPU ThreadCommunicator, every pointer passed to it is a DEVICE pointer on
// the rank's GPU, and the collectives are stream-ordered: they are enqueued on the
// stream set with set_stream() and complete before later work on that stream. Only
// Barrier() waits on the host.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend.h"

namespace superpose::cuda {

class NcclCommunicator : public engine::Communicator {
 public:
  // One communicator per entry of `devices` (rank i on devices[i]).
  static absl::StatusOr<std::vector<std::unique_ptr<NcclCommunicator>>> CreateGroup(
      const std::vector<int>& devices);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int32_t rank() const override { return rank_; }
  int32_t size() const override { return size_; }
  int device() const { return device_; }
  void set_stream(cudaStream_t stream) { stream_ = stream; }

  absl::Status AllReduceSum(float* data, int64_t count) override;
  absl::Status AllGather(const float* in, int64_t count, float* out) override;
  absl::Status Broadcast(float* data, int64_t count, int32_t root) override;
  absl::Status Barrier() override;
  // ncclCommAbort: stops this rank's pending collectives (a peer will not join them);
  // later ones fail with ABORTED. Serialized with the enqueue calls by mu_.
  void Abort() override;

 private:
  NcclCommunicator(ncclComm_t comm, int32_t rank, int32_t size, int device, float* scratch)
      : comm_(comm), rank_(rank), size_(size), device_(device), scratch_(scratch) {}

  absl::Mutex mu_;
  ncclComm_t comm_ ABSL_GUARDED_BY(mu_);  // null once aborted
  int32_t rank_;
  int32_t size_;
  int device_;
  float* scratch_;  // one float on the device, for Barrier
  cudaStream_t stream_ = nullptr;
};

}  // namespace superpose::cuda
