// The CUDA backend's public class, its factories and the GEMM and upload helpers; the
// rest of its work is in the files listed in cuda/cuda_backend_impl.h.
#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend_impl.h"
#include "cuda/cuda_errors.h"
#include "cuda/nccl_communicator.h"
#include "engine/model/weights.h"
#include "engine/tensor_parallel.h"
#include "engine/util/status.h"

namespace superpose::cuda {

int32_t CudaDeviceCount(std::string* error) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (error != nullptr) *error = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && error != nullptr) *error = "no CUDA device";
  return n;
}

absl::Status GemmBf16(cublasHandle_t handle, const bf16* x, int32_t rows, int32_t in, const bf16* w,
                      int32_t out, float* y) {
  if (rows <= 0 || out <= 0) return absl::OkStatus();
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major view: Y^T [out, rows] = W [in, out]^T * X^T [in, rows].
  SP_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w,
                                         CUDA_R_16BF, in, x, CUDA_R_16BF, in, &beta, y, CUDA_R_32F,
                                         out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status UploadBf16(const float* src, size_t n, bf16* dst) {
  if (n == 0) return absl::OkStatus();
  constexpr size_t kChunk = size_t{1} << 24;
  std::vector<uint16_t> tmp(std::min(n, kChunk));
  for (size_t off = 0; off < n; off += kChunk) {
    const size_t m = std::min(kChunk, n - off);
    for (size_t i = 0; i < m; ++i) tmp[i] = engine::F32ToBf16(src[off + i]);
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(dst + off, tmp.data(), m * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }
  return absl::OkStatus();
}

absl::Status UploadF32(const std::vector<float>& src, DeviceArray<float>* dst) {
  SP_RETURN_IF_ERROR(dst->Allocate(src.size()));
  if (src.empty()) return absl::OkStatus();
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(dst->get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

CudaBackend::Impl::~Impl() {
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  if (stream != nullptr) cudaStreamSynchronize(stream);
  // Graphs first (they reference the buffers), then device memory with this device
  // current, then the handles.
  DestroyGraphs();
  gact.Reset();
  glocal.Reset();
  gmeta.Reset();
  gmeta_host.Reset();
  layers.clear();
  embed.Reset();
  lm_head.Reset();
  lm_head_q = DeviceQuant{};
  quant_scratch.Reset();
  final_norm.Reset();
  inv_freq.Reset();
  k_cache.Reset();
  v_cache.Reset();
  split_ws.Reset();
  eager.Reset();
  for (auto* a : {&local, &gathered, &logits, &lp_out}) a->Reset();
  hn.Reset();
  meta.Reset();
  meta_host.Reset();
  top_meta.Reset();
  lp_meta.Reset();
  lp_meta_host.Reset();
  top_id.Reset();
  top_logit.Reset();
  top_lse.Reset();
  top_meta_host.Reset();
  samp_meta.Reset();
  samp_out.Reset();
  samp_meta_host.Reset();
  samp_host.Reset();
  top_host.Reset();
  lora.u.Reset();
  if (cublas != nullptr) cublasDestroy(cublas);
  cublas_workspace.Reset();
  if (stream != nullptr) cudaStreamDestroy(stream);
  if (prev >= 0) cudaSetDevice(prev);
}

CudaBackend::CudaBackend(const engine::BackendOptions& options, const CudaOptions& cuda,
                         int32_t device, NcclCommunicator* comm)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  impl_->cuda_options = cuda;
  impl_->device = device;
  impl_->comm = comm;
}

CudaBackend::~CudaBackend() = default;

namespace {

// Runs one of the backend's entry points: fails at once after a sticky error; records
// one when `fn` hits it.
template <typename Fn>
absl::Status Guarded(CudaBackend::Impl& impl, Fn fn) {
  if (absl::Status h = impl.Health(); !h.ok()) return h;
  absl::Status st = fn();
  if (!st.ok()) impl.NoteFailure(st);
  return st;
}

}  // namespace

absl::Status CudaBackend::Load(const ModelConfig& config, const WeightSource& weights,
                               const Shard& shard) {
  Impl& m = *impl_;
  return Guarded(m, [&]() -> absl::Status {
    SP_RETURN_IF_ERROR(m.Setup(config, shard));
    SP_RETURN_IF_ERROR(m.AllocateWeights());
    SP_RETURN_IF_ERROR(m.ReadWeights(weights));
    return m.Finish();
  });
}

absl::Status CudaBackend::LoadRandom(const ModelConfig& config, const Shard& shard, uint64_t seed,
                                     float scale) {
  Impl& m = *impl_;
  return Guarded(m, [&]() -> absl::Status {
    SP_RETURN_IF_ERROR(m.Setup(config, shard));
    SP_RETURN_IF_ERROR(m.AllocateWeights());
    SP_RETURN_IF_ERROR(m.FillRandom(seed, scale));
    return m.Finish();
  });
}

absl::Status CudaBackend::Forward(const BatchPlan& plan, ForwardOutput* out) {
  return Guarded(*impl_, [&] { return impl_->Forward(plan, out); });
}

absl::Status CudaBackend::LoadAdapter(int64_t id, const engine::LoraAdapter& adapter) {
  return Guarded(*impl_, [&] { return impl_->LoadAdapter(id, adapter); });
}

absl::Status CudaBackend::UnloadAdapter(int64_t id) { return impl_->lora.table.Unload(id); }

absl::Status CudaBackend::Health() const { return impl_->Health(); }

absl::Status CudaBackend::ZeroKvBlocks(absl::Span<const BlockId> blocks) {
  return Guarded(*impl_, [&] { return impl_->ZeroKvBlocks(blocks); });
}

absl::StatusOr<std::vector<uint8_t>> CudaBackend::KvBlockBytes(BlockId block) const {
  return impl_->KvBlockBytes(block);
}

KvPoolInfo CudaBackend::kv() const { return impl_->kv_info; }

bool CudaBackend::SamplesRows() const { return impl_->cuda_options.row_sampling; }
int64_t CudaBackend::weight_bytes() const { return impl_->WeightBytes(); }
int32_t CudaBackend::attention_tile_tokens() const { return impl_->attn_tile; }

void CudaBackend::set_cuda_graphs(bool on) { impl_->graphs_on = on; }

CudaBackend::GraphStats CudaBackend::graph_stats() const {
  const Impl& m = *impl_;
  GraphStats s;
  s.enabled = m.graphs_allowed && m.graphs_on && !m.graphs_failed;
  for (const Impl::DecodeGraph& g : m.graphs) s.graphs += g.exec != nullptr ? 1 : 0;
  s.captures = m.graph_captures;
  s.replays = m.graph_replays;
  s.invalidations = m.graph_invalidations;
  s.device_bytes = m.GraphBytes();
  return s;
}

absl::StatusOr<std::unique_ptr<engine::Backend>> MakeCudaBackend(
    const engine::BackendOptions& options, const CudaOptions& cuda) {
  std::string why;
  const int32_t n = CudaDeviceCount(&why);
  if (n == 0) return absl::FailedPreconditionError("no usable CUDA device: " + why);
  const int32_t tp = options.tensor_parallel;
  if (tp <= 1)
    return std::unique_ptr<engine::Backend>(std::make_unique<CudaBackend>(options, cuda, 0));
  if (tp > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tp=", tp, " needs ", tp, " GPUs, this node has ", n));
  }
  std::vector<int> devices(tp);
  for (int32_t r = 0; r < tp; ++r) devices[r] = r;
  auto group = NcclCommunicator::CreateGroup(devices);
  if (!group.ok()) return group.status();
  std::vector<std::unique_ptr<engine::Backend>> ranks;
  std::vector<std::unique_ptr<engine::Communicator>> comms;
  for (int32_t r = 0; r < tp; ++r) {
    ranks.push_back(std::make_unique<CudaBackend>(options, cuda, r, (*group)[r].get()));
    comms.push_back(std::move((*group)[r]));
  }
  return std::unique_ptr<engine::Backend>(
      std::make_unique<engine::TensorParallelBackend>(std::move(ranks), std::move(comms), nullptr));
}

void RegisterBackend(engine::BackendRegistry& registry) {
  registry.Register<CudaOptions>("cuda", ParseCudaOptions, MakeCudaBackend);
}

}  // namespace superpose::cuda
