// Launchers of the CUDA backend's own kernels (cuda/kernels.cu). Every pointer is a
// device pointer; every launcher enqueues on `stream` and returns the launch error
// (cudaGetLastError) without synchronizing. Activations between kernels are float32;
// weights, the KV pool and GEMM inputs are bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attn_tile.h"
#include "engine/row_sampling.h"

namespace superpose::cuda {

using bf16 = __nv_bfloat16;

// x[t, :] = embed[tokens[t] - vocab_begin, :] (as float), or 0 when the token is not in
// [vocab_begin, vocab_begin + vocab_local) (vocabulary-parallel embedding).
cudaError_t LaunchEmbedding(const int32_t* tokens, int32_t T, const bf16* embed,
                            int32_t vocab_begin, int32_t vocab_local, int32_t H, float* x,
                            cudaStream_t stream);

// Per row t: if `add`, x[t] += add[t] (x is updated in place); then
// h[t] = bf16(x[t] / sqrt(mean(x[t]^2) + eps) * w). `add` may be null.
cudaError_t LaunchAddRmsNorm(float* x, const float* add, const float* w, int32_t T, int32_t H,
                             float eps, bf16* h, cudaStream_t stream);

// out[r, :] = in[rows[r], :] for r < R (rows of `cols` elements; `out` must not overlap
// `in`).
cudaError_t LaunchGatherRows(const bf16* in, const int32_t* rows, int32_t R, int32_t cols,
                             bf16* out, cudaStream_t stream);
cudaError_t LaunchGatherRows(const float* in, const int32_t* rows, int32_t R, int32_t cols,
                             float* out, cudaStream_t stream);

// After the QKV projection. qkv: [T, (qh + 2 * kvh) * D] float (q heads, k heads, v
// heads). Per token: adds `bias` (may be null; same layout as a qkv row), applies the
// per-head RMSNorm q_norm / k_norm (may be null; [D] each), RoPE (rotate_half, angle =
// positions[t] * inv_freq[i] in float32) to q and k; writes q to q_out [T, qh, D] float
// and k, v as bf16 into the pool at k_layer/v_layer + (slots[t] * kvh + head) * D, where
// slots[t] = block * block_size + slot.
cudaError_t LaunchQkvPost(const float* qkv, const float* bias, const float* q_norm,
                          const float* k_norm, const float* positions, const float* inv_freq,
                          const int32_t* slots, int32_t T, int32_t qh, int32_t kvh, int32_t D,
                          float eps, float* q_out, bf16* k_layer, bf16* v_layer,
                          cudaStream_t stream);

// Shared memory (bytes) of the attention kernel for `rows` query rows (tokens x group).
size_t AttentionSharedBytes(int32_t rows, int32_t D);
// Raises the kernel's dynamic shared-memory limit on the current device to at least
// `bytes` (never lowers it).
cudaError_t PrepareAttention(size_t bytes);

// Paged causal attention with GQA. For each tile and local kv head g, the query rows are
// the tile's tokens x the group's G = qh / kvh query heads (local heads g*G .. g*G+G-1).
// A token with index i among its sequence's new tokens sees keys[key_off ..
// key_off + ctx_len + i] (inclusive), each key an index block * block_size + slot into
// the layer's pool [slot][kvh][D]. q: [T, qh, D] float; out: [T, qh, D] bf16.
// `max_tile_tokens` bounds every tile's ntok and sizes the shared memory; 1 is the
// decode variant (one block per sequence and kv head), larger tiles are the prefill
// variant (each K/V tile is loaded once for all of the tile's tokens).
cudaError_t LaunchAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                            const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                            int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                            float scale, bf16* out, cudaStream_t stream);

// Split-K attention (cuda/attention_body.h: SplitRange, AttentionCombine): nsplit
// (1..kMaxSplits) blocks per (tile, kv head), each over a range of at least min_keys
// keys, write partial results into `workspace` (num_tiles * kvh * nsplit *
// SplitPartialFloats(max_tile_tokens * (qh / kvh), D) floats), then one block per
// (tile, kv head) merges them into `out`. For decode steps with too few (sequence, kv
// head) pairs to fill the GPU. PrepareSplitAttention(AttentionSharedBytes(rows, D))
// first, as for LaunchAttention.
cudaError_t PrepareSplitAttention(size_t bytes);
cudaError_t LaunchSplitAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                                 const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                                 int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                                 float scale, int32_t nsplit, int32_t min_keys, float* workspace,
                                 bf16* out, cudaStream_t stream);

// The same attention on tensor cores (cuda/attention_tc_body.h: bf16 Q, K, V and P,
// float32 scores, softmax and accumulation), for prefill steps. Needs head_dim D a
// multiple of 16 up to 128 and max_tile_tokens * (qh / kvh) <= 64 (else
// cudaErrorInvalidValue), and PrepareTcAttention(D) on the device first.
cudaError_t LaunchTcAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                              const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                              int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                              float scale, bf16* out, cudaStream_t stream);
// Shared memory (bytes) of the tensor-core kernel for head_dim D (~72 KiB at 64, ~111 KiB
// at 128), and raising the device's limit for it (never lowered).
size_t TcAttentionSharedBytesFor(int32_t D);
cudaError_t PrepareTcAttention(int32_t D);

// act[t, i] = bf16(silu(gu[t, i]) * gu[t, I + i]) for gu [T, 2I] float.
cudaError_t LaunchSwiGlu(const float* gu, int32_t T, int32_t I, bf16* act, cudaStream_t stream);

// out[i] = logits[rows[i], targets[i]] - logsumexp(logits[rows[i], :]), logits [*, V].
cudaError_t LaunchLogprobs(const float* logits, int32_t V, const int32_t* rows,
                           const int32_t* targets, int32_t n, float* out, cudaStream_t stream);

// Compact logits rows (cuda/top_logits_body.h): for each i < R, the ns[i] best tokens
// of logits[rows[i], :] (logit descending, lower id first on ties) into
// out_id/out_logit[i * kTopMax ...], and that row's log-sum-exp into out_lse[i].
// 1 <= ns[i] <= min(V, kTopMax).
cudaError_t LaunchTopLogits(const float* logits, int32_t V, const int32_t* rows, const int32_t* ns,
                            int32_t R, int32_t* out_id, float* out_logit, float* out_lse,
                            cudaStream_t stream);

// Row sampling (cuda/sample_body.h, engine/row_sampling.h): for each i < R, the token
// drawn from logits[rows[i], :] with params[i] into out_token[i], its logit into
// out_logit[i].
cudaError_t LaunchSampleRows(const float* logits, int32_t V, const int32_t* rows,
                             const engine::RowSampling* params, int32_t R, int32_t* out_token,
                             float* out_logit, cudaStream_t stream);

// Fills n bf16 values with uniform(-scale, scale) from a counter-based hash of
// (seed, index): deterministic, generated on the device (benchmarks, tests).
cudaError_t LaunchFillRandom(bf16* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream);
// Loads every kernel of this file on the current device now (with CUDA's lazy module
// loading the first launch would otherwise load it, in the middle of a step).
cudaError_t LoadKernels();

// Fills n floats with `value`.
cudaError_t LaunchFillF32(float* p, int64_t n, float value, cudaStream_t stream);

}  // namespace superpose::cuda
