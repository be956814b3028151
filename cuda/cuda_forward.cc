// One step of a rank: metadata upload, embedding and layers (EnqueueLayers, also what
// the decode graphs capture), then the LM head over the rows that want logits, in chunks.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cuda/attention_tc_body.h"
#include "cuda/cuda_backend_impl.h"
#include "cuda/lazy_stage.h"
#include "engine/lazy.h"
#include "engine/util/status.h"

namespace superpose::cuda {

absl::Status CudaBackend::Impl::ReserveActivations(Activations& a, size_t T) {
  const size_t H = config.hidden_size, D = config.head_dim;
  const size_t qd = q_heads * D, qkv_w = qd + 2 * kv_heads * D;
  SP_RETURN_IF_ERROR(a.x.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.h.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.qkv.Reserve(T * qkv_w));
  SP_RETURN_IF_ERROR(a.q.Reserve(T * qd));
  SP_RETURN_IF_ERROR(a.attn.Reserve(T * qd));
  SP_RETURN_IF_ERROR(a.proj.Reserve(T * H));
  SP_RETURN_IF_ERROR(a.gu.Reserve(T * 2 * inter));
  SP_RETURN_IF_ERROR(a.act.Reserve(T * inter));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueLayers(const Activations& a, const StepInputs& in,
                                              int32_t T) {
  SP_RETURN_IF_ERROR(EnqueueEmbedding(a, in, T));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    SP_RETURN_IF_ERROR(EnqueueAttentionHalf(a, in, T, l));
    SP_RETURN_IF_ERROR(EnqueueMlpHalf(a, in, T, l));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueEmbedding(const Activations& a, const StepInputs& in,
                                                 int32_t T) {
  const int32_t H = config.hidden_size;
  SP_CUDA_RETURN_IF_ERROR(
      LaunchEmbedding(in.tokens, T, embed.get(), vocab_begin, vocab_local, H, a.x.get(), stream));
  return AllReduce(a.x.get(), static_cast<int64_t>(T) * H);
}

absl::Status CudaBackend::Impl::EnqueueAttentionHalf(const Activations& a, const StepInputs& in,
                                                     int32_t T, int32_t l) {
  const int32_t H = config.hidden_size, D = config.head_dim;
  const int32_t qd = q_heads * D, kvd = kv_heads * D, qkv_w = qd + 2 * kvd;
  const float eps = config.rms_norm_eps;
  const Layer& L = WeightsOf(l);
  if (l == 0) {
    SP_CUDA_RETURN_IF_ERROR(
        LaunchAddRmsNorm(a.x.get(), nullptr, L.attn_norm.get(), T, H, eps, a.h.get(), stream));
  }
  SP_RETURN_IF_ERROR(Project(a.h.get(), T, H, L.wqkv, L.wqkv_q, qkv_w, a.qkv.get()));
  SP_RETURN_IF_ERROR(ApplyLora(in, engine::LoraSite::kQkv, l, a.h.get(), H, a.qkv.get(), qkv_w));
  bf16* kl = KeyLayer(l);
  bf16* vl = v_cache.get() + (kl - k_cache.get());
  SP_CUDA_RETURN_IF_ERROR(LaunchQkvPost(
      a.qkv.get(), L.bqkv.empty() ? nullptr : L.bqkv.get(),
      L.q_norm.empty() ? nullptr : L.q_norm.get(), L.k_norm.empty() ? nullptr : L.k_norm.get(),
      in.pos, inv_freq.get(), in.slots, T, q_heads, kv_heads, D, eps, a.q.get(), kl, vl, stream));
  SP_RETURN_IF_ERROR(EnqueueAttention(a, in, kl, vl));
  SP_RETURN_IF_ERROR(Project(a.attn.get(), T, qd, L.wo, L.wo_q, H, a.proj.get()));
  SP_RETURN_IF_ERROR(ApplyLora(in, engine::LoraSite::kO, l, a.attn.get(), qd, a.proj.get(), H));
  SP_RETURN_IF_ERROR(AllReduce(a.proj.get(), static_cast<int64_t>(T) * H));
  SP_CUDA_RETURN_IF_ERROR(
      LaunchAddRmsNorm(a.x.get(), a.proj.get(), L.mlp_norm.get(), T, H, eps, a.h.get(), stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueMlpHalf(const Activations& a, const StepInputs& in,
                                               int32_t T, int32_t l) {
  const int32_t H = config.hidden_size;
  const float eps = config.rms_norm_eps;
  const Layer& L = WeightsOf(l);
  SP_RETURN_IF_ERROR(Project(a.h.get(), T, H, L.wgate_up, L.wgate_up_q, 2 * inter, a.gu.get()));
  SP_RETURN_IF_ERROR(
      ApplyLora(in, engine::LoraSite::kGateUp, l, a.h.get(), H, a.gu.get(), 2 * inter));
  SP_CUDA_RETURN_IF_ERROR(LaunchSwiGlu(a.gu.get(), T, inter, a.act.get(), stream));
  SP_RETURN_IF_ERROR(Project(a.act.get(), T, inter, L.wdown, L.wdown_q, H, a.proj.get()));
  SP_RETURN_IF_ERROR(
      ApplyLora(in, engine::LoraSite::kDown, l, a.act.get(), inter, a.proj.get(), H));
  SP_RETURN_IF_ERROR(AllReduce(a.proj.get(), static_cast<int64_t>(T) * H));
  // Residual add fused with the next norm (the final norm after the last layer).
  const float* next_norm =
      l + 1 < config.num_layers ? WeightsOf(l + 1).attn_norm.get() : final_norm.get();
  SP_CUDA_RETURN_IF_ERROR(
      LaunchAddRmsNorm(a.x.get(), a.proj.get(), next_norm, T, H, eps, a.h.get(), stream));
  return absl::OkStatus();
}

bf16* CudaBackend::Impl::KeyLayer(int32_t l) const {
  const size_t layer_elems =
      static_cast<size_t>(kv_info.num_blocks) * kv_info.block_size * kv_heads * config.head_dim;
  return k_cache.get() + static_cast<size_t>(l) * layer_elems;
}

// Prefill tiles on tensor cores (when chosen), small decode steps split-K, the rest on
// the SIMT kernel.
absl::Status CudaBackend::Impl::EnqueueAttention(const Activations& a, const StepInputs& in,
                                                 const bf16* kl, const bf16* vl) {
  const int32_t D = config.head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (tc_attention && in.tile_tokens > 1) {
    SP_CUDA_RETURN_IF_ERROR(LaunchTcAttention(a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles,
                                              in.tile_tokens, q_heads, kv_heads, D, scale,
                                              a.attn.get(), stream));
  } else if (const int32_t nsplit = DecodeSplits(in.num_tiles, in.tile_tokens); nsplit > 1) {
    SP_CUDA_RETURN_IF_ERROR(LaunchSplitAttention(
        a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles, in.tile_tokens, q_heads, kv_heads, D,
        scale, nsplit, kSplitMinKeys, split_ws.get(), a.attn.get(), stream));
  } else {
    SP_CUDA_RETURN_IF_ERROR(LaunchAttention(a.q.get(), kl, vl, in.keys, in.tiles, in.num_tiles,
                                            in.tile_tokens, q_heads, kv_heads, D, scale,
                                            a.attn.get(), stream));
  }
  return absl::OkStatus();
}

int32_t CudaBackend::Impl::DecodeSplits(int32_t num_tiles, int32_t tile_tokens) const {
  if (!split_decode || tile_tokens != 1 || num_tiles <= 0) return 1;
  const int64_t blocks = static_cast<int64_t>(num_tiles) * kv_heads;
  if (blocks >= sm_count) return 1;
  return static_cast<int32_t>(
      std::min<int64_t>(kMaxSplits, (2 * static_cast<int64_t>(sm_count) + blocks - 1) / blocks));
}

size_t CudaBackend::Impl::SplitWorkspaceFloats() const {
  return 3 * static_cast<size_t>(sm_count) *
         SplitPartialFloats(q_heads / kv_heads, config.head_dim);
}

absl::Status CudaBackend::Impl::Forward(const BatchPlan& plan, ForwardOutput* out) {
  if (!loaded) return absl::FailedPreconditionError("cuda backend: Forward before Load");
  SP_RETURN_IF_ERROR(engine::ValidatePlan(plan, kv_info, config.vocab_size));
  out->logits.clear();
  out->logprobs.clear();
  out->top.clear();
  out->sampled.clear();
  out->sampled_logit.clear();
  out->top_lse.clear();
  out->lazy.clear();
  SP_RETURN_IF_ERROR(CheckNoRevival(plan));
  SP_RETURN_IF_ERROR(engine::ValidateLazyPlan(plan, kv_info, config.num_layers));
  if (plan.num_tokens() == 0) return absl::OkStatus();
  SP_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  if (!plan.sampling.empty() && !cuda_options.row_sampling) {
    for (const engine::RowSampling& r : plan.sampling) {
      if (r.temperature > 0.0f) {
        return absl::FailedPreconditionError("cuda backend: row sampling is off");
      }
    }
  }
  SP_RETURN_IF_ERROR(ReserveRowBuffers(plan));
  // Step metadata: tokens, positions, slots, keys, tiles, rows.
  absl::StatusOr<StepMeta> sm = BuildStepMeta(plan, kv_info.block_size, attn_tile);
  if (!sm.ok()) return sm.status();
  // The step's adapters stay alive until it returns (every path ends in a sync).
  absl::StatusOr<std::vector<std::shared_ptr<const CudaLora>>> adapters = PrepareLora(plan, &*sm);
  if (!adapters.ok()) return adapters.status();
  // LazyLLM steps run eagerly, stage by stage (cuda_lazy.cc).
  if (AnyLazy(plan)) return ForwardLazy(plan, *adapters, out);
  if (GraphEligible(plan, *sm)) {
    absl::StatusOr<bool> done = ForwardGraph(plan, *sm, out);
    if (!done.ok()) return done.status();
    if (*done) return absl::OkStatus();
    out->logits.clear();
    out->top.clear();
    out->sampled.clear();
    out->sampled_logit.clear();
    out->top_lse.clear();
  }
  return ForwardEager(plan, *sm, out);
}

// Buffers of the step's compact and sampled rows, before any of its work is queued.
absl::Status CudaBackend::Impl::ReserveRowBuffers(const BatchPlan& plan) {
  size_t compact = 0, sampled = 0;
  for (int32_t n : plan.logits_top) compact += n > 0;
  for (const engine::RowSampling& r : plan.sampling) sampled += r.temperature > 0.0f;
  SP_RETURN_IF_ERROR(ReserveTop(compact));
  if (sampled > 0) {
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    SP_RETURN_IF_ERROR(samp_meta.Reserve((kWords + 1) * sampled));
    SP_RETURN_IF_ERROR(samp_meta_host.Reserve((kWords + 1) * sampled));
    SP_RETURN_IF_ERROR(samp_out.Reserve(2 * sampled));
    SP_RETURN_IF_ERROR(samp_host.Reserve(2 * sampled));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::ForwardEager(const BatchPlan& plan, const StepMeta& sm,
                                             ForwardOutput* out) {
  const int32_t T = plan.num_tokens();
  const int32_t R = static_cast<int32_t>(sm.rows.size());
  const int32_t NL = sm.num_logprobs;
  // The pinned buffers are reused by the next step: every path below ends in a sync.
  struct SyncOnExit {
    cudaStream_t s;
    ~SyncOnExit() { cudaStreamSynchronize(s); }
  } sync_on_exit{stream};
  absl::StatusOr<StepInputs> in = UploadStepMeta(sm);
  if (!in.ok()) return in.status();
  // Every buffer before the layers: no cudaMalloc/cudaFree once this step's collectives
  // are queued (a device-synchronizing call between NCCL launches of different ranks can
  // hang). The logits rows go through the LM head in chunks of at most kLogitsChunkRows
  // rows, so that a scoring step of thousands of rows needs no more memory than that.
  SP_RETURN_IF_ERROR(ReserveActivations(eager, static_cast<size_t>(T)));
  const int32_t C = std::min(R, kLogitsChunkRows);
  if (R > 0) SP_RETURN_IF_ERROR(ReserveLogitsBuffers(C, NL));
  SP_RETURN_IF_ERROR(EnqueueLayers(eager, *in, T));
  return FinishEager(plan, sm, C, out);
}

absl::Status CudaBackend::Impl::FinishEager(const BatchPlan& plan, const StepMeta& sm, int32_t C,
                                            ForwardOutput* out) {
  const int32_t R = static_cast<int32_t>(sm.rows.size());
  const int32_t NL = sm.num_logprobs;
  if (R == 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    return absl::OkStatus();
  }
  std::vector<int32_t> lp_order(NL);
  SP_RETURN_IF_ERROR(EnqueueLogitsChunks(plan, sm, C, &lp_order, out));
  SP_RETURN_IF_ERROR(EndLogits());
  std::vector<float> lp_grouped(NL);
  if (NL > 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lp_grouped.data(), lp_out.get(), NL * sizeof(float),
                                            cudaMemcpyDeviceToHost, stream));
  }
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  UnpackTop(plan, out);
  out->logprobs.resize(NL);
  for (int32_t j = 0; j < NL; ++j) out->logprobs[lp_order[j]] = lp_grouped[j];
  return absl::OkStatus();
}

absl::StatusOr<CudaBackend::Impl::StepInputs> CudaBackend::Impl::UploadStepMeta(
    const StepMeta& sm) {
  const std::vector<int32_t>& host = sm.words;
  SP_RETURN_IF_ERROR(meta_host.Reserve(host.size()));
  SP_RETURN_IF_ERROR(meta.Reserve(host.size()));
  std::memcpy(meta_host.get(), host.data(), host.size() * sizeof(int32_t));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      meta.get(), meta_host.get(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  StepInputs in;
  in.tokens = meta.get();
  in.pos = reinterpret_cast<const float*>(meta.get() + sm.off_pos);
  in.slots = meta.get() + sm.off_slots;
  in.keys = meta.get() + sm.off_keys;
  in.tiles = reinterpret_cast<const AttnTile*>(meta.get() + sm.off_tiles);
  in.num_tiles = sm.num_tiles;
  in.tile_tokens = sm.tile_tokens;
  in.lora_segs = meta.get() + sm.off_lora;
  in.num_lora_segs = sm.num_lora_segs;
  return in;
}

absl::Status CudaBackend::Impl::ReserveLogitsBuffers(int32_t C, int32_t NL) {
  const size_t Cs = static_cast<size_t>(C), H = config.hidden_size;
  const int32_t tp = shard.size;
  SP_RETURN_IF_ERROR(hn.Reserve(Cs * H));
  SP_RETURN_IF_ERROR(local.Reserve(Cs * vocab_pad));
  if (tp > 1) {
    SP_RETURN_IF_ERROR(logits.Reserve(Cs * config.vocab_size));
    SP_RETURN_IF_ERROR(gathered.Reserve(static_cast<size_t>(tp) * Cs * vocab_pad));
  }
  if (NL > 0) {
    SP_RETURN_IF_ERROR(lp_out.Reserve(NL));
    SP_RETURN_IF_ERROR(lp_meta.Reserve(2 * static_cast<size_t>(NL)));
    SP_RETURN_IF_ERROR(lp_meta_host.Reserve(2 * static_cast<size_t>(NL)));
  }
  return absl::OkStatus();
}

// Logits: gather rows, lm_head (vocabulary-parallel), all-gather, log-softmax, chunk by
// chunk. Rows [0, nl) are plan.logits_for's; log-prob requests name rows.
absl::Status CudaBackend::Impl::EnqueueLogitsChunks(const BatchPlan& plan, const StepMeta& sm,
                                                    int32_t C, std::vector<int32_t>* lp_order,
                                                    ForwardOutput* out) {
  const int32_t V = config.vocab_size, H = config.hidden_size;
  const int32_t R = static_cast<int32_t>(sm.rows.size()), NL = sm.num_logprobs;
  const size_t nl = plan.logits_for.size();
  const int32_t chunks = (R + C - 1) / C;
  std::vector<int32_t> local_row(nl);
  for (size_t i = 0; i < nl; ++i) local_row[i] = static_cast<int32_t>(i % static_cast<size_t>(C));
  SP_RETURN_IF_ERROR(BeginLogits(plan, std::move(local_row), out));
  std::vector<int32_t> lp_begin(chunks + 1, 0);
  if (NL > 0) SP_RETURN_IF_ERROR(UploadLogprobMeta(sm, C, chunks, &lp_begin, lp_order));
  const int32_t* d_rows = meta.get() + sm.off_rows;
  for (int32_t k = 0; k < chunks; ++k) {
    const int32_t r0 = k * C, Rc = std::min(C, R - r0);
    SP_CUDA_RETURN_IF_ERROR(LaunchGatherRows(eager.h.get(), d_rows + r0, Rc, H, hn.get(), stream));
    SP_RETURN_IF_ERROR(LmHead(hn.get(), Rc, local.get()));
    absl::StatusOr<const float*> chunk_logits = ChunkLogits(Rc);
    if (!chunk_logits.ok()) return chunk_logits.status();
    const size_t i0 = std::min(nl, static_cast<size_t>(r0)),
                 i1 = std::min(nl, static_cast<size_t>(r0 + Rc));
    SP_RETURN_IF_ERROR(EnqueueLogitsRange(plan, *chunk_logits, i0, i1, out));
    const int32_t n = lp_begin[k + 1] - lp_begin[k];
    if (n > 0) {
      SP_CUDA_RETURN_IF_ERROR(LaunchLogprobs(*chunk_logits, V, lp_meta.get() + lp_begin[k],
                                             lp_meta.get() + NL + lp_begin[k], n,
                                             lp_out.get() + lp_begin[k], stream));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const float*> CudaBackend::Impl::ChunkLogits(int32_t Rc) {
  // [Rc, V] logits: this rank's own when tp = 1 (vocab_pad == V), else reassembled.
  const int32_t tp = shard.size, V = config.vocab_size;
  if (tp == 1) return static_cast<const float*>(local.get());
  const size_t Rcs = static_cast<size_t>(Rc);
  SP_RETURN_IF_ERROR(
      nccl->AllGather(local.get(), static_cast<int64_t>(Rcs) * vocab_pad, gathered.get()));
  for (int32_t rk = 0; rk < tp; ++rk) {
    const int32_t v0 = std::min(V, rk * vocab_pad), v1 = std::min(V, v0 + vocab_pad);
    if (v1 <= v0) continue;
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
        logits.get() + v0, sizeof(float) * V,
        gathered.get() + static_cast<size_t>(rk) * Rcs * vocab_pad, sizeof(float) * vocab_pad,
        sizeof(float) * (v1 - v0), Rcs, cudaMemcpyDeviceToDevice, stream));
  }
  return static_cast<const float*>(logits.get());
}

}  // namespace superpose::cuda
