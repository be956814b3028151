// LoRA adapters on the CUDA backend: upload (LoadAdapter), the step's segment table
// (PrepareLora) and the apply after each fused projection (ApplyLora).
#include "cuda/cuda_lora.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend_impl.h"
#include "cuda/lora_kernels.h"
#include "cuda/lora_segments.h"
#include "engine/model/weights.h"
#include "engine/util/status.h"

namespace superpose::cuda {

static_assert(kLoraSites == engine::kNumLoraSites, "lora_body.h: sites");
static_assert(kLoraSlots == engine::kMaxLoraSiteProjs, "lora_body.h: slots");
static_assert(kLoraMaxRank == engine::kMaxLoraRank, "lora_body.h: rank");
static_assert(kLoraThreads >= kLoraMaxRank, "a shrink block needs a thread per rank");

CudaLora::~CudaLora() {
  int prev = -1;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  weights.Reset();
  descs.Reset();
  if (prev >= 0) cudaSetDevice(prev);
}

namespace {

void AppendBf16(const std::vector<float>& src, std::vector<uint16_t>* dst) {
  for (float v : src) dst->push_back(engine::F32ToBf16(v));
}

// The host images of an adapter's weights and descriptors; the descriptors' pointers
// are set once the weights have their device address (a_off, bt_off: in elements).
struct HostLora {
  std::vector<uint16_t> weights;
  std::vector<LoraDesc<bf16>> descs;
  std::vector<size_t> a_off, bt_off;  // per descriptor
};

absl::StatusOr<HostLora> PackLora(const engine::ShardedLora& lora) {
  HostLora h;
  h.descs.resize(LoraDescIndex(static_cast<int32_t>(lora.layers.size()), 0, 0));
  h.a_off.resize(h.descs.size());
  h.bt_off.resize(h.descs.size());
  for (size_t l = 0; l < lora.layers.size(); ++l) {
    for (int32_t site = 0; site < kLoraSites; ++site) {
      const std::vector<engine::LoraProj>& projs = lora.layers[l][site];
      if (projs.size() > static_cast<size_t>(kLoraSlots)) {
        return absl::InternalError("adapter: more modules at one site than the kernels take");
      }
      for (size_t slot = 0; slot < projs.size(); ++slot) {
        const engine::LoraProj& p = projs[slot];
        const size_t i = LoraDescIndex(static_cast<int32_t>(l), site, static_cast<int32_t>(slot));
        LoraDesc<bf16>& d = h.descs[i];
        h.a_off[i] = h.weights.size();
        AppendBf16(p.a, &h.weights);
        h.bt_off[i] = h.weights.size();
        AppendBf16(p.bt, &h.weights);
        d.rank = p.rank;
        d.in = p.in;
        d.out = p.out;
        d.offset = p.offset;
        d.scale = p.scale;
      }
    }
  }
  return h;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const CudaLora>> UploadLora(const engine::ShardedLora& lora,
                                                           int32_t device) {
  absl::StatusOr<HostLora> h = PackLora(lora);
  if (!h.ok()) return h.status();
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  auto out = std::make_shared<CudaLora>();
  out->device = device;
  SP_RETURN_IF_ERROR(out->weights.Allocate(h->weights.size()));
  SP_RETURN_IF_ERROR(out->descs.Allocate(h->descs.size()));
  for (size_t i = 0; i < h->descs.size(); ++i) {
    if (h->descs[i].rank == 0) continue;
    h->descs[i].a = out->weights.get() + h->a_off[i];
    h->descs[i].bt = out->weights.get() + h->bt_off[i];
  }
  out->bytes = static_cast<int64_t>(h->weights.size() * sizeof(uint16_t) +
                                    h->descs.size() * sizeof(LoraDesc<bf16>));
  // A stream of its own: nothing here waits for (or is ordered with) a running step.
  cudaStream_t s = nullptr;
  SP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaError_t e = cudaSuccess;
  if (!h->weights.empty()) {
    e = cudaMemcpyAsync(out->weights.get(), h->weights.data(), h->weights.size() * sizeof(uint16_t),
                        cudaMemcpyHostToDevice, s);
  }
  if (e == cudaSuccess && !h->descs.empty()) {
    e = cudaMemcpyAsync(out->descs.get(), h->descs.data(), h->descs.size() * sizeof(LoraDesc<bf16>),
                        cudaMemcpyHostToDevice, s);
  }
  const cudaError_t sync = cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  SP_CUDA_RETURN_IF_ERROR(e);
  SP_CUDA_RETURN_IF_ERROR(sync);
  return std::shared_ptr<const CudaLora>(std::move(out));
}

absl::Status CudaBackend::Impl::LoadAdapter(int64_t id, const engine::LoraAdapter& adapter) {
  if (!loaded) return absl::FailedPreconditionError("cuda backend: LoadAdapter before Load");
  if (adapter.layers.size() != static_cast<size_t>(config.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("adapter has ", adapter.layers.size(),
                                                   " layers, the model ", config.num_layers));
  }
  engine::LoraShard s;
  s.rank = shard.rank;
  s.q_heads = q_heads;
  s.kv_heads = kv_heads;
  s.kv_head_begin = kv_head_begin;
  s.inter = inter;
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  SP_CUDA_RETURN_IF_ERROR(LoadLoraKernels());
  absl::StatusOr<std::shared_ptr<const CudaLora>> dev =
      UploadLora(*engine::ShardLora(adapter, config, s), device);
  if (!dev.ok()) return dev.status();
  return lora.table.Load(id, *std::move(dev));
}

absl::StatusOr<std::vector<std::shared_ptr<const CudaLora>>> CudaBackend::Impl::PrepareLora(
    const BatchPlan& plan, StepMeta* sm) {
  absl::StatusOr<std::vector<std::shared_ptr<const CudaLora>>> held = lora.table.Resolve(plan);
  if (!held.ok()) return held.status();
  std::vector<LoraSeqRows> rows(plan.seqs.size());
  bool any = false;
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    if ((*held)[i] == nullptr) continue;
    rows[i] = {plan.seqs[i].token_begin, plan.seqs[i].num_tokens, (*held)[i]->descs.get()};
    any = true;
  }
  if (!any) return held;
  sm->off_lora = sm->words.size();
  sm->num_lora_segs = AppendLoraSegments(rows, &sm->words);
  SP_RETURN_IF_ERROR(
      lora.u.Reserve(static_cast<size_t>(plan.num_tokens()) * static_cast<size_t>(kLoraUWidth)));
  return held;
}

absl::Status CudaBackend::Impl::ApplyLora(const StepInputs& in, engine::LoraSite site,
                                          int32_t layer, const bf16* x, int32_t x_width, float* y,
                                          int32_t y_width) {
  if (in.num_lora_segs == 0) return absl::OkStatus();
  static constexpr int32_t kSlots[kLoraSites] = {3, 1, 2, 1};  // q k v | o | gate up | down
  const int32_t s = static_cast<int32_t>(site);
  SP_CUDA_RETURN_IF_ERROR(LaunchLoraSite(in.lora_segs, in.num_lora_segs, layer, s, kSlots[s], x,
                                         x_width, lora.u.get(), y, y_width, y_width, stream));
  return absl::OkStatus();
}

}  // namespace superpose::cuda
