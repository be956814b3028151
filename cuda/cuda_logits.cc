// Logits rows of a step to the host: whole rows copied, compact rows (the best tokens
// and the log-sum-exp) and sampled rows computed on the device, log-probability requests
// grouped by LM-head chunk.
#include <cstring>
#include <vector>

#include "cuda/cuda_backend_impl.h"
#include "cuda/top_logits_body.h"
#include "engine/util/status.h"

namespace superpose::cuda {

static_assert(kTopMax == engine::kMaxTopLogits, "compact rows: one bound for engine and kernel");

absl::Status CudaBackend::Impl::ReserveTop(size_t compact) {
  if (compact == 0) return absl::OkStatus();
  SP_RETURN_IF_ERROR(top_meta.Reserve(2 * compact));
  SP_RETURN_IF_ERROR(top_meta_host.Reserve(2 * compact));
  SP_RETURN_IF_ERROR(top_id.Reserve(compact * kTopMax));
  SP_RETURN_IF_ERROR(top_logit.Reserve(compact * kTopMax));
  SP_RETURN_IF_ERROR(top_lse.Reserve(compact));
  return top_host.Reserve(compact * (2 * kTopMax + 1));
}

absl::Status CudaBackend::Impl::BeginLogits(const BatchPlan& plan, std::vector<int32_t> local_row,
                                            ForwardOutput* out) {
  const int32_t V = config.vocab_size;
  const size_t nl = plan.logits_for.size();
  lc.local_row = std::move(local_row);
  lc.slot.assign(nl, -1);
  lc.sampled.assign(nl, -1);
  lc.compact = 0;
  lc.num_sampled = 0;
  size_t whole = 0;
  for (size_t i = 0; i < nl; ++i) {
    if (Sampled(plan, i)) lc.sampled[i] = static_cast<int64_t>(lc.num_sampled++);
    if (Compact(plan, i)) {
      lc.slot[i] = static_cast<int64_t>(lc.compact++);
    } else if (!Sampled(plan, i)) {
      lc.slot[i] = static_cast<int64_t>(whole++);
    }
  }
  out->logits.resize(whole * V);
  if (lc.num_sampled > 0) {
    // [params | local rows], uploaded once for every range.
    const size_t S = lc.num_sampled;
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    int32_t* m = samp_meta_host.get();
    for (size_t i = 0; i < nl; ++i) {
      if (lc.sampled[i] < 0) continue;
      std::memcpy(m + static_cast<size_t>(lc.sampled[i]) * kWords, &plan.sampling[i],
                  sizeof(engine::RowSampling));
      m[kWords * S + static_cast<size_t>(lc.sampled[i])] = lc.local_row[i];
    }
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(samp_meta.get(), m, (kWords + 1) * S * sizeof(int32_t),
                                            cudaMemcpyHostToDevice, stream));
  }
  if (lc.compact == 0) return absl::OkStatus();
  // [local rows | ns] of the compact rows, in order; uploaded once for every range.
  int32_t* m = top_meta_host.get();
  for (size_t i = 0; i < nl; ++i) {
    if (!Compact(plan, i)) continue;
    m[lc.slot[i]] = lc.local_row[i];
    m[lc.compact + lc.slot[i]] = plan.logits_top[i];
  }
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(top_meta.get(), m, 2 * lc.compact * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EnqueueLogitsRange(const BatchPlan& plan, const float* dev,
                                                   size_t i0, size_t i1, ForwardOutput* out) {
  const int32_t V = config.vocab_size;
  auto whole = [&](size_t i) { return engine::RowLayout::Whole(plan, i); };
  // Whole rows: runs consecutive both on the device and in out->logits in one copy.
  for (size_t i = i0; i < i1;) {
    if (!whole(i)) {
      ++i;
      continue;
    }
    size_t j = i + 1;
    while (j < i1 && whole(j) && lc.local_row[j] == lc.local_row[j - 1] + 1) ++j;
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(out->logits.data() + static_cast<size_t>(lc.slot[i]) * V,
                        dev + static_cast<size_t>(lc.local_row[i]) * V, (j - i) * V * sizeof(float),
                        cudaMemcpyDeviceToHost, stream));
    i = j;
  }
  // Sampled rows of the range: consecutive sampled indices [s0, s1).
  int64_t s0 = -1, s1 = -1;
  for (size_t i = i0; i < i1; ++i) {
    if (lc.sampled[i] < 0) continue;
    if (s0 < 0) s0 = lc.sampled[i];
    s1 = lc.sampled[i] + 1;
  }
  if (s0 >= 0) {
    const size_t S = lc.num_sampled, a = static_cast<size_t>(s0);
    constexpr size_t kWords = sizeof(engine::RowSampling) / sizeof(int32_t);
    SP_CUDA_RETURN_IF_ERROR(
        LaunchSampleRows(dev, V, samp_meta.get() + kWords * S + a,
                         reinterpret_cast<const engine::RowSampling*>(samp_meta.get()) + a,
                         static_cast<int32_t>(s1 - s0), samp_out.get() + a,
                         reinterpret_cast<float*>(samp_out.get() + S) + a, stream));
  }
  // Compact rows of the range: consecutive compact indices [c0, c1).
  int64_t c0 = -1, c1 = -1;
  for (size_t i = i0; i < i1; ++i) {
    if (!Compact(plan, i)) continue;
    if (c0 < 0) c0 = lc.slot[i];
    c1 = lc.slot[i] + 1;
  }
  if (c0 < 0) return absl::OkStatus();
  const size_t c = static_cast<size_t>(c0);
  SP_CUDA_RETURN_IF_ERROR(LaunchTopLogits(
      dev, V, top_meta.get() + c, top_meta.get() + lc.compact + c, static_cast<int32_t>(c1 - c0),
      top_id.get() + c * kTopMax, top_logit.get() + c * kTopMax, top_lse.get() + c, stream));
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::EndLogits() {
  if (lc.num_sampled > 0) {
    SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(samp_host.get(), samp_out.get(),
                                            2 * lc.num_sampled * sizeof(int32_t),
                                            cudaMemcpyDeviceToHost, stream));
  }
  if (lc.compact == 0) return absl::OkStatus();
  const size_t compact = lc.compact;
  int32_t* h = top_host.get();
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h, top_id.get(), compact * kTopMax * sizeof(int32_t),
                                          cudaMemcpyDeviceToHost, stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h + compact * kTopMax, top_logit.get(),
                                          compact * kTopMax * sizeof(float), cudaMemcpyDeviceToHost,
                                          stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(h + 2 * compact * kTopMax, top_lse.get(),
                                          compact * sizeof(float), cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

void CudaBackend::Impl::UnpackTop(const BatchPlan& plan, ForwardOutput* out) const {
  out->sampled.assign(samp_host.get(), samp_host.get() + lc.num_sampled);
  const float* sampled_logit = reinterpret_cast<const float*>(samp_host.get() + lc.num_sampled);
  out->sampled_logit.assign(sampled_logit, sampled_logit + lc.num_sampled);
  size_t compact = 0;
  for (int32_t n : plan.logits_top) compact += n > 0;
  if (compact == 0) return;
  const int32_t* ids = top_host.get();
  const float* logit = reinterpret_cast<const float*>(ids + compact * kTopMax);
  const float* lse = logit + compact * kTopMax;
  size_t c = 0;
  for (int32_t n : plan.logits_top) {
    if (n == 0) continue;
    for (int32_t j = 0; j < n; ++j) {
      out->top.push_back({ids[c * kTopMax + j], logit[c * kTopMax + j]});
    }
    out->top_lse.push_back(lse[c]);
    ++c;
  }
}

absl::Status CudaBackend::Impl::UploadLogprobMeta(const StepMeta& sm, int32_t C, int32_t chunks,
                                                  std::vector<int32_t>* lp_begin,
                                                  std::vector<int32_t>* lp_order) {
  const int32_t NL = sm.num_logprobs;
  const int32_t* lp_row = sm.words.data() + sm.off_lp_row;
  const int32_t* lp_target = sm.words.data() + sm.off_lp_target;
  std::vector<int32_t>& begin = *lp_begin;
  for (int32_t i = 0; i < NL; ++i) ++begin[lp_row[i] / C + 1];
  for (int32_t k = 0; k < chunks; ++k) begin[k + 1] += begin[k];
  std::vector<int32_t> fill(begin.begin(), begin.end() - 1);
  int32_t* m = lp_meta_host.get();
  for (int32_t i = 0; i < NL; ++i) {
    const int32_t j = fill[lp_row[i] / C]++;
    (*lp_order)[j] = i;
    m[j] = lp_row[i] % C;
    m[NL + j] = lp_target[i];
  }
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(lp_meta.get(), m,
                                          2 * static_cast<size_t>(NL) * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

}  // namespace superpose::cuda
