// Host-vector entry points to each kernel of cuda/kernels.cu and to the bf16 GEMM, for
// tests against CPU references: inputs that the kernel reads as bf16 are given as
// floats and rounded to bf16 on upload (RoundBf16 gives the same rounding on the host),
// results come back as floats. Each call synchronizes.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "cuda/kernels.h"

namespace superpose::cuda::check {

float RoundBf16(float v);

absl::Status Embedding(const std::vector<int32_t>& tokens, const std::vector<float>& table,
                       int32_t vocab_begin, int32_t vocab_local, int32_t H, std::vector<float>* x);
// `add` may be empty (no residual add). x is updated in place.
absl::Status AddRmsNorm(std::vector<float>* x, const std::vector<float>& add,
                        const std::vector<float>& w, int32_t T, int32_t H, float eps,
                        std::vector<float>* h);
// bias, q_norm, k_norm may be empty. k_pool / v_pool: [num_slots, kvh, D] (in and out).
absl::Status QkvPost(const std::vector<float>& qkv, const std::vector<float>& bias,
                     const std::vector<float>& q_norm, const std::vector<float>& k_norm,
                     const std::vector<float>& positions, const std::vector<float>& inv_freq,
                     const std::vector<int32_t>& slots, int32_t qh, int32_t kvh, int32_t D,
                     float eps, std::vector<float>* q, std::vector<float>* k_pool,
                     std::vector<float>* v_pool);
absl::Status Attention(const std::vector<float>& q, const std::vector<float>& k_pool,
                       const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                       const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                       int32_t qh, int32_t kvh, int32_t D, float scale, std::vector<float>* out);
// The tensor-core prefill kernel (LaunchTcAttention) on the same inputs.
absl::Status TcAttention(const std::vector<float>& q, const std::vector<float>& k_pool,
                         const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                         const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                         int32_t qh, int32_t kvh, int32_t D, float scale, std::vector<float>* out);
// The split-K kernels (LaunchSplitAttention) on the same inputs.
absl::Status SplitAttention(const std::vector<float>& q, const std::vector<float>& k_pool,
                            const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                            const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                            int32_t qh, int32_t kvh, int32_t D, float scale, int32_t nsplit,
                            int32_t min_keys, std::vector<float>* out);
absl::Status SwiGlu(const std::vector<float>& gu, int32_t T, int32_t I, std::vector<float>* act);
absl::Status Gemm(const std::vector<float>& x, const std::vector<float>& w, int32_t rows,
                  int32_t in, int32_t out, std::vector<float>* y);
absl::Status Logprobs(const std::vector<float>& logits, int32_t V, const std::vector<int32_t>& rows,
                      const std::vector<int32_t>& targets, std::vector<float>* out);

// LaunchTopLogits: per entry of `rows`, ns[i] ids and logits (in rank order) and the
// row's log-sum-exp.
absl::Status TopLogits(const std::vector<float>& logits, int32_t V,
                       const std::vector<int32_t>& rows, const std::vector<int32_t>& ns,
                       std::vector<std::vector<int32_t>>* ids,
                       std::vector<std::vector<float>>* top_logits, std::vector<float>* lse);

// LaunchSampleRows: per entry of `rows`, the token drawn with params[i] and its logit.
absl::Status SampleRows(const std::vector<float>& logits, int32_t V,
                        const std::vector<int32_t>& rows,
                        const std::vector<engine::RowSampling>& params,
                        std::vector<int32_t>* tokens, std::vector<float>* token_logits);

}  // namespace superpose::cuda::check
