// LazyLLM in the CUDA forward (docs/architecture.md "LazyLLM"): a step with lazy
// sequences runs eagerly, layer by layer. At a sequence's boundary layer, after the
// attention block, the score kernels (cuda/lazy_body.h) compute its last new token's
// softmax rows over the stage's keys for the local query heads and sum them; the sums
// are all-reduced over the tensor-parallel ranks and read back while the MLP runs;
// after it the host decides with the CPU backend's rules (cuda/lazy_stage.h), the kept
// rows of x and h are gathered and the next stage's metadata is uploaded.
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cuda/cuda_backend_impl.h"
#include "cuda/kernels.h"
#include "cuda/lazy_kernels.h"
#include "cuda/lazy_stage.h"
#include "engine/util/status.h"

namespace superpose::cuda {
namespace {

using Impl = CudaBackend::Impl;

// The adapters' device descriptors per plan sequence (null: none).
std::vector<const void*> LoraDescs(const std::vector<std::shared_ptr<const CudaLora>>& adapters) {
  std::vector<const void*> d(adapters.size(), nullptr);
  for (size_t i = 0; i < adapters.size(); ++i) {
    if (adapters[i] != nullptr) d[i] = adapters[i]->descs.get();
  }
  return d;
}

// Every buffer of the step, before its first collective (no cudaMalloc once NCCL work
// is queued).
absl::Status ReserveLazyStep(Impl& m, const BatchPlan& plan, const StageMeta& first, int32_t C) {
  const size_t T = plan.tokens.size(), H = m.config.hidden_size;
  const size_t words = LazyMetaWordsBound(plan, first.sm.words.size());
  SP_RETURN_IF_ERROR(m.meta.Reserve(words));
  SP_RETURN_IF_ERROR(m.meta_host.Reserve(words));
  SP_RETURN_IF_ERROR(m.ReserveActivations(m.eager, T));
  if (!first.sm.rows.empty()) SP_RETURN_IF_ERROR(m.ReserveLogitsBuffers(C, first.sm.num_logprobs));
  Impl::LazyBuffers& b = m.lazy_bufs;
  const size_t nf = std::max<size_t>(1, LazyScoreFloatsBound(plan));
  SP_RETURN_IF_ERROR(b.scores.Reserve(nf));
  SP_RETURN_IF_ERROR(b.head_rows.Reserve(nf * static_cast<size_t>(m.q_heads)));
  SP_RETURN_IF_ERROR(b.scores_host.Reserve(nf));
  SP_RETURN_IF_ERROR(b.x.Reserve(T * H));
  return b.h.Reserve(T * H);
}

// The items of `st` scored at layer l: [*i0, *i1).
void ItemsAt(const StageMeta& st, int32_t l, size_t* i0, size_t* i1) {
  *i0 = std::lower_bound(st.item_layer.begin(), st.item_layer.end(), l) - st.item_layer.begin();
  *i1 = std::upper_bound(st.item_layer.begin(), st.item_layer.end(), l) - st.item_layer.begin();
}

// Scores of the items at layer l (after its attention block): kernels, the sum over
// the ranks, the copy to the host (read after the next sync).
absl::Status EnqueueScores(Impl& m, const StageMeta& st, int32_t l) {
  size_t i0 = 0, i1 = 0;
  ItemsAt(st, l, &i0, &i1);
  if (i0 == i1) return absl::OkStatus();
  const int32_t D = m.config.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const auto* items = reinterpret_cast<const LazyScoreItem*>(m.meta.get() + st.off_items) + i0;
  Impl::LazyBuffers& b = m.lazy_bufs;
  SP_CUDA_RETURN_IF_ERROR(LaunchLazyScores(items, static_cast<int32_t>(i1 - i0), m.eager.q.get(),
                                           m.KeyLayer(l), m.meta.get() + st.sm.off_keys, m.q_heads,
                                           m.kv_heads, D, scale, b.head_rows.get(), b.scores.get(),
                                           m.stream));
  const int32_t f0 = st.items[i0].out_off;
  const int32_t f1 = st.items[i1 - 1].out_off + st.items[i1 - 1].nk;
  // Every rank holds some heads: the sum over all of them, the same on every rank.
  SP_RETURN_IF_ERROR(m.AllReduce(b.scores.get() + f0, f1 - f0));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(b.scores_host.get() + f0, b.scores.get() + f0,
                                          sizeof(float) * static_cast<size_t>(f1 - f0),
                                          cudaMemcpyDeviceToHost, m.stream));
  return absl::OkStatus();
}

// After the sync: each item's head-averaged scores of its sequence's rows (the keys
// are the stage's context, never a candidate, then the rows).
std::vector<std::vector<float>> ReadScores(const Impl& m, const BatchPlan& plan,
                                           const LazyRows& rows, const StageMeta& st, int32_t l) {
  std::vector<std::vector<float>> scores(plan.seqs.size());
  size_t i0 = 0, i1 = 0;
  ItemsAt(st, l, &i0, &i1);
  for (size_t i = i0; i < i1; ++i) {
    const LazyScoreItem& it = st.items[i];
    const int32_t si = st.item_seq[i], n = rows.count[si];
    const float* s = m.lazy_bufs.scores_host.get() + it.out_off + (it.nk - n);
    std::vector<float>& v = scores[si];
    v.assign(s, s + n);
    for (float& x : v) x /= static_cast<float>(m.config.num_heads);
  }
  return scores;
}

bool AnyBoundaryAt(const BatchPlan& plan, const LazyRows& rows, int32_t l) {
  for (size_t si = 0; si < plan.seqs.size(); ++si) {
    if (LazyAtBoundary(plan.seqs[si], rows.stage[si], l)) return true;
  }
  return false;
}

// Uploads stage `st`'s metadata (the stream is idle or ordered before its readers: the
// pinned copy is only rewritten after a sync).
absl::StatusOr<Impl::StepInputs> UploadStage(Impl& m, const StageMeta& st) {
  if (st.sm.words.size() > m.meta.size()) return absl::InternalError("lazy: metadata bound");
  return m.UploadStepMeta(st.sm);
}

// The kept rows (gather words of `st`, R of them) of x and h, in place.
absl::Status GatherRows(Impl& m, const StageMeta& st, int32_t R) {
  const int32_t H = m.config.hidden_size;
  const size_t n = static_cast<size_t>(R) * H;
  const int32_t* rows = m.meta.get() + st.off_gather;
  Impl::LazyBuffers& b = m.lazy_bufs;
  SP_CUDA_RETURN_IF_ERROR(LaunchGatherRows(m.eager.x.get(), rows, R, H, b.x.get(), m.stream));
  SP_CUDA_RETURN_IF_ERROR(LaunchGatherRows(m.eager.h.get(), rows, R, H, b.h.get(), m.stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.eager.x.get(), b.x.get(), n * sizeof(float),
                                          cudaMemcpyDeviceToDevice, m.stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(m.eager.h.get(), b.h.get(), n * sizeof(bf16),
                                          cudaMemcpyDeviceToDevice, m.stream));
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaBackend::Impl::ForwardLazy(
    const BatchPlan& plan, const std::vector<std::shared_ptr<const CudaLora>>& adapters,
    ForwardOutput* out) {
  struct SyncOnExit {
    cudaStream_t s;
    ~SyncOnExit() { cudaStreamSynchronize(s); }
  } sync_on_exit{stream};
  const std::vector<const void*> descs = LoraDescs(adapters);
  LazyRows rows = AllLazyRows(plan);
  std::vector<int32_t> result_of;
  StartLazyOutput(plan, &result_of, out);
  absl::StatusOr<StageMeta> st =
      BuildStageMeta(plan, rows, descs, {}, kv_info.block_size, attn_tile);
  if (!st.ok()) return st.status();
  const int32_t C = std::min(static_cast<int32_t>(st->sm.rows.size()), kLogitsChunkRows);
  SP_RETURN_IF_ERROR(ReserveLazyStep(*this, plan, *st, C));
  absl::StatusOr<StepInputs> in = UploadStage(*this, *st);
  if (!in.ok()) return in.status();
  SP_RETURN_IF_ERROR(EnqueueEmbedding(eager, *in, plan.num_tokens()));
  std::vector<int32_t> gather;
  for (int32_t l = 0; l < config.num_layers; ++l) {
    const int32_t R = static_cast<int32_t>(rows.token.size());
    SP_RETURN_IF_ERROR(EnqueueAttentionHalf(eager, *in, R, l));
    SP_RETURN_IF_ERROR(EnqueueScores(*this, *st, l));
    SP_RETURN_IF_ERROR(EnqueueMlpHalf(eager, *in, R, l));
    CountLazyRows(rows, l, result_of, out);
    if (!AnyBoundaryAt(plan, rows, l)) continue;
    SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    const std::vector<std::vector<float>> scores = ReadScores(*this, plan, rows, *st, l);
    LazyPruneRows(plan, l, scores, result_of, &rows, &gather, out);
    st = BuildStageMeta(plan, rows, descs, gather, kv_info.block_size, attn_tile);
    if (!st.ok()) return st.status();
    in = UploadStage(*this, *st);
    if (!in.ok()) return in.status();
    SP_RETURN_IF_ERROR(GatherRows(*this, *st, static_cast<int32_t>(rows.token.size())));
  }
  return FinishEager(plan, st->sm, C, out);
}

}  // namespace superpose::cuda
