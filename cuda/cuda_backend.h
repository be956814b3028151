// The CUDA backend: bf16 weights and KV cache, float32 accumulation and activations,
// cuBLAS GEMMs and the kernels of cuda/kernels.cu; tensor parallelism over the GPUs of
// one node through NCCL (one thread per GPU, TensorParallelBackend). This header has no
// CUDA includes, so the server and tools include it like any other.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cuda/cuda_options.h"
#include "engine/backend.h"

namespace superpose::cuda {

// Usable CUDA devices; 0 when cudaGetDeviceCount fails (no driver, no device), with
// the reason in *error when given.
int32_t CudaDeviceCount(std::string* error = nullptr);
inline bool CudaAvailable(std::string* error = nullptr) { return CudaDeviceCount(error) > 0; }

class NcclCommunicator;

class CudaBackend : public engine::Backend {
 public:
  // The whole model on GPU `device` (Load with Shard{}), or, with `comm`, one rank of a
  // tensor-parallel group (Load with the Shard of comm's rank and size; comm's device is
  // `device`). options.tensor_parallel is not read here (MakeCudaBackend builds groups).
  CudaBackend(const engine::BackendOptions& options, const CudaOptions& cuda, int32_t device,
              NcclCommunicator* comm = nullptr);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  std::string compute_dtype() const override;  // "bfloat16", "int8" or "q4"
  absl::Status Load(const engine::ModelConfig& config, const engine::WeightSource& weights,
                    const engine::Shard& shard) override;
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override;
  engine::KvPoolInfo kv() const override;
  // Rows with plan.sampling are drawn on the GPU (cuda/sample_body.h) unless
  // CudaOptions::row_sampling is off.
  bool SamplesRows() const override;
  // FAILED_PRECONDITION once a sticky CUDA error (an illegal address, a launch failure,
  // an uncorrectable ECC error: cuda/cuda_errors.h) made the device unusable for this
  // process; Load and Forward then fail at once. Thread-safe.
  absl::Status Health() const override;
  // LoRA adapters: this rank's part in bf16 on the device (cuda/cuda_lora.h), applied
  // by segmented kernels after each fused projection; steps with adapters run eagerly
  // (no CUDA graph). Thread-safe against a running Forward.
  bool SupportsAdapters() const override { return true; }
  bool SupportsLazy() const override { return true; }  // LazyLLM: cuda_lazy.cc
  absl::Status LoadAdapter(int64_t id, const engine::LoraAdapter& adapter) override;
  absl::Status UnloadAdapter(int64_t id) override;
  // Private mode's zeroing of freed blocks, and the tests' reader (cuda_kv_pool.cc).
  absl::Status ZeroKvBlocks(absl::Span<const engine::BlockId> blocks) override;
  absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(engine::BlockId block) const override;

  // Benchmarks and tests: allocates the weights of `config` for `shard` and fills them
  // on the device (no host copy): matrices, embeddings and biases uniform(-scale,
  // scale) from `seed`, norm weights 1.
  absl::Status LoadRandom(const engine::ModelConfig& config, const engine::Shard& shard,
                          uint64_t seed, float scale = 0.03f);
  // Device bytes held for weights (this rank).
  int64_t weight_bytes() const;
  // Query tokens per attention block in prefill steps (set at load from shared memory).
  int32_t attention_tile_tokens() const;

  // CUDA graphs of decode steps (CudaOptions::graphs; never with tensor parallelism).
  // Benchmarks and tests switch them off and on between steps (graphs already captured
  // are kept); it cannot switch them on when the options or tp > 1 have them off.
  void set_cuda_graphs(bool on);
  struct GraphStats {
    bool enabled = false;       // options, tp = 1, set_cuda_graphs, and no capture failure
    int32_t graphs = 0;         // instantiated now (one per batch size)
    int64_t captures = 0;       // graphs captured and instantiated so far
    int64_t replays = 0;        // decode steps run by launching a graph
    int64_t invalidations = 0;  // times every graph was dropped (metadata buffer grown)
    int64_t device_bytes = 0;   // graph buffers + estimated memory of the instantiated graphs
  };
  GraphStats graph_stats() const;

  // The implementation (cuda/cuda_backend_impl.h, internal to cuda/).
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// One CudaBackend on GPU 0 (options.tensor_parallel 1) or options.tensor_parallel ranks
// on GPUs 0..tp-1 joined by NCCL. Load it with Shard{}.
absl::StatusOr<std::unique_ptr<engine::Backend>> MakeCudaBackend(
    const engine::BackendOptions& options, const CudaOptions& cuda = {});

// Registers "cuda" (ParseCudaOptions, MakeCudaBackend).
void RegisterBackend(engine::BackendRegistry& registry);

}  // namespace superpose::cuda
