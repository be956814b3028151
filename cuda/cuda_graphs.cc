// CUDA graphs of decode steps: capture per batch size, replay, invalidation when the
// metadata buffer grows, and the fallback to eager steps.
#include <algorithm>
#include <chrono>

#include "cuda/cuda_backend_impl.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::cuda {

// ---- CUDA graphs of decode steps. ----
//
// A decode step (every sequence one new token, no log-probabilities, tp = 1) of B <=
// kGraphMaxBatch tokens launches the same kernels with the same parameters whatever the
// contexts: grids depend on B and the model only (attention: one block per sequence and
// kv head, each reading its key count from its tile), and every per-step value (tokens,
// positions, write slots, tiles, keys) is read from device memory. So one graph per B,
// captured over fixed buffers, serves every later step of that size: the step uploads
// its metadata into the fixed buffer in the decode layout, launches the graph, and
// copies the logits rows it wants. The graph computes the logits of all B rows (as the
// eager step does when every row wants them, the engine's decode steps).

bool CudaBackend::Impl::GraphEligible(const BatchPlan& plan, const StepMeta& sm) const {
  if (!graphs_allowed || !graphs_on || graphs_failed) return false;
  if (sm.num_lora_segs > 0) return false;  // adapters run eagerly (docs/architecture.md)
  const int32_t T = plan.num_tokens();
  if (T < 1 || T > kGraphMaxBatch || !plan.logprobs.empty()) return false;
  if (static_cast<int32_t>(plan.seqs.size()) != T) return false;
  for (const engine::SeqPlan& seq : plan.seqs) {
    if (seq.num_tokens != 1) return false;
  }
  return sm.tile_tokens == 1 && sm.num_tiles == T;
}

absl::Status CudaBackend::Impl::EnsureGraphBuffers(size_t meta_words) {
  if (gact.x.empty()) {
    SP_RETURN_IF_ERROR(ReserveActivations(gact, kGraphMaxBatch));
    SP_RETURN_IF_ERROR(glocal.Allocate(static_cast<size_t>(kGraphMaxBatch) * vocab_pad));
  }
  if (meta_words > gmeta.size()) {
    if (!gmeta.empty()) {
      // The graphs point into the old buffer.
      DestroyGraphs();
      ++graph_invalidations;
      spdlog::debug("CUDA graphs: {} metadata words needed, {} held: recapturing", meta_words,
                    gmeta.size());
    }
    const size_t first = DecodeMetaLayout(kGraphMaxBatch).off_keys + kGraphInitialKeys;
    SP_RETURN_IF_ERROR(
        gmeta.Allocate(std::max({meta_words, first, gmeta.size() + gmeta.size() / 2})));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::CaptureGraph(int32_t B) {
  const DecodeLayout l = DecodeMetaLayout(B);
  StepInputs in;
  in.tokens = gmeta.get();
  in.pos = reinterpret_cast<const float*>(gmeta.get() + l.off_pos);
  in.slots = gmeta.get() + l.off_slots;
  in.tiles = reinterpret_cast<const AttnTile*>(gmeta.get() + l.off_tiles);
  in.keys = gmeta.get() + l.off_keys;
  in.num_tiles = B;
  in.tile_tokens = 1;

  size_t free0 = 0, free1 = 0, total = 0;
  SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free0, &total));
  const auto t0 = std::chrono::steady_clock::now();
  // Thread-local mode: only this thread's calls are checked (other backends in the
  // process may allocate meanwhile).
  SP_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  absl::Status body = EnqueueLayers(gact, in, B);
  if (body.ok()) body = LmHead(gact.h.get(), B, glocal.get());
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream, &graph);  // always ends the capture
  if (!body.ok() || end != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    if (!body.ok()) return body;
    return CudaStatus(end, "cudaStreamEndCapture", __FILE__, __LINE__);
  }
  size_t nodes = 0;
  cudaGraphGetNodes(graph, nullptr, &nodes);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    cudaGetLastError();
    return CudaStatus(inst, "cudaGraphInstantiate", __FILE__, __LINE__);
  }
  const cudaError_t up = cudaGraphUpload(exec, stream);
  if (up != cudaSuccess) {
    cudaGraphExecDestroy(exec);
    cudaGetLastError();
    return CudaStatus(up, "cudaGraphUpload", __FILE__, __LINE__);
  }
  SP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free1, &total));
  DecodeGraph& g = graphs[B];
  g.exec = exec;
  g.bytes = free0 > free1 ? static_cast<int64_t>(free0 - free1) : 0;
  if (graph_captures++ == 0) {
    spdlog::info(
        "CUDA graphs: decode steps of batch sizes up to {} replay captured graphs ({:.1f} MiB "
        "of graph buffers)",
        kGraphMaxBatch, static_cast<double>(GraphBytes() - g.bytes) / 1048576.0);
  }
  spdlog::debug(
      "CUDA graphs: batch {} captured: {} nodes, {:.2f} MiB, {:.1f} ms", B, nodes,
      static_cast<double>(g.bytes) / 1048576.0,
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return absl::OkStatus();
}

absl::StatusOr<bool> CudaBackend::Impl::ForwardGraph(const BatchPlan& plan, const StepMeta& sm,
                                                     ForwardOutput* out) {
  const int32_t B = plan.num_tokens();
  if (!GraphReady(B)) return false;
  const size_t words = DecodeMetaWords(sm, B);
  absl::Status st = EnsureGraphBuffers(words);  // may drop every graph
  if (st.ok()) st = gmeta_host.Reserve(words);
  if (st.ok()) st = PackDecodeMeta(sm, B, gmeta_host.get());
  if (st.ok() && graphs[B].exec == nullptr) st = CaptureGraph(B);
  if (!st.ok()) {
    DisableGraphs(st);
    return false;
  }

  struct SyncOnExit {
    cudaStream_t s;
    ~SyncOnExit() { cudaStreamSynchronize(s); }
  } sync_on_exit{stream};
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(gmeta.get(), gmeta_host.get(), words * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, stream));
  const cudaError_t e = cudaGraphLaunch(graphs[B].exec, stream);
  if (e != cudaSuccess) {
    DisableGraphs(CudaStatus(e, "cudaGraphLaunch", __FILE__, __LINE__));
    return false;
  }
  ++graph_replays;
  // Rows of plan.logits_for (tp = 1: glocal rows are V floats, one per token).
  SP_RETURN_IF_ERROR(BeginLogits(plan, plan.logits_for, out));
  SP_RETURN_IF_ERROR(EnqueueLogitsRange(plan, glocal.get(), 0, plan.logits_for.size(), out));
  SP_RETURN_IF_ERROR(EndLogits());
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  UnpackTop(plan, out);
  return true;
}

bool CudaBackend::Impl::GraphReady(int32_t B) {
  if (graphs[B].exec != nullptr) return true;
  // The first step of a size runs eagerly: it loads the kernels cuBLAS picks for it
  // outside of any capture.
  if (!graphs[B].warm) {
    graphs[B].warm = true;
    return false;
  }
  if (GraphBytes() >= kGraphMemoryBudget) {
    if (!graphs_budget_warned) {
      spdlog::warn("CUDA graphs: {:.0f} MiB held, no more captured (batch {} runs eagerly)",
                   static_cast<double>(GraphBytes()) / 1048576.0, B);
      graphs_budget_warned = true;
    }
    return false;
  }
  return true;
}

void CudaBackend::Impl::DestroyGraphs() {
  for (DecodeGraph& g : graphs) {
    if (g.exec != nullptr) cudaGraphExecDestroy(g.exec);
    g.exec = nullptr;
    g.bytes = 0;
  }
}

void CudaBackend::Impl::ResetGraphs() {
  if (stream != nullptr) cudaStreamSynchronize(stream);
  DestroyGraphs();
  for (DecodeGraph& g : graphs) g.warm = false;
  gact.Reset();
  glocal.Reset();
  gmeta.Reset();
  graphs_failed = false;
  graphs_budget_warned = false;
}

void CudaBackend::Impl::DisableGraphs(const absl::Status& why) {
  if (!graphs_failed) {
    spdlog::warn("CUDA graphs: {}; decode steps launch their kernels one by one from now on",
                 why.ToString());
  }
  graphs_failed = true;
  cudaGetLastError();
  if (stream != nullptr) cudaStreamSynchronize(stream);
  DestroyGraphs();
  gact.Reset();
  glocal.Reset();
  gmeta.Reset();
}

int64_t CudaBackend::Impl::GraphBytes() const {
  int64_t n = gact.bytes() + static_cast<int64_t>(glocal.size()) * 4 +
              static_cast<int64_t>(gmeta.size()) * 4;
  for (const DecodeGraph& g : graphs) n += g.bytes;
  return n;
}

}  // namespace superpose::cuda
