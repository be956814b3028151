#include "cuda/kernel_check.h"

#include <cublas_v2.h>

#include "cuda/attention_body.h"
#include "cuda/cuda_util.h"
#include "cuda/top_logits_body.h"
#include "engine/model/weights.h"
#include "engine/util/status.h"

namespace superpose::cuda::check {
namespace {

template <typename T>
absl::Status Put(const std::vector<T>& v, DeviceArray<T>* d) {
  SP_RETURN_IF_ERROR(d->Allocate(v.size()));
  if (!v.empty()) {
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(d->get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  return absl::OkStatus();
}

absl::Status PutBf16(const std::vector<float>& v, DeviceArray<bf16>* d) {
  SP_RETURN_IF_ERROR(d->Allocate(v.size()));
  return UploadBf16(v.data(), v.size(), d->get());
}

absl::Status Get(const DeviceArray<float>& d, size_t n, std::vector<float>* v) {
  v->resize(n);
  if (n > 0) {
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(v->data(), d.get(), n * sizeof(float), cudaMemcpyDeviceToHost));
  }
  return absl::OkStatus();
}

absl::Status GetBf16(const DeviceArray<bf16>& d, size_t n, std::vector<float>* v) {
  std::vector<uint16_t> raw(n);
  if (n > 0) {
    SP_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(raw.data(), d.get(), n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  }
  v->resize(n);
  for (size_t i = 0; i < n; ++i) (*v)[i] = engine::Bf16ToF32(raw[i]);
  return absl::OkStatus();
}

absl::Status Sync(cudaError_t launch) {
  SP_CUDA_RETURN_IF_ERROR(launch);
  SP_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

}  // namespace

float RoundBf16(float v) { return engine::Bf16ToF32(engine::F32ToBf16(v)); }

absl::Status Embedding(const std::vector<int32_t>& tokens, const std::vector<float>& table,
                       int32_t vocab_begin, int32_t vocab_local, int32_t H, std::vector<float>* x) {
  DeviceArray<int32_t> dt;
  DeviceArray<bf16> de;
  DeviceArray<float> dx;
  SP_RETURN_IF_ERROR(Put(tokens, &dt));
  SP_RETURN_IF_ERROR(PutBf16(table, &de));
  const int32_t T = static_cast<int32_t>(tokens.size());
  SP_RETURN_IF_ERROR(dx.Allocate(static_cast<size_t>(T) * H));
  SP_RETURN_IF_ERROR(
      Sync(LaunchEmbedding(dt.get(), T, de.get(), vocab_begin, vocab_local, H, dx.get(), nullptr)));
  return Get(dx, static_cast<size_t>(T) * H, x);
}

absl::Status AddRmsNorm(std::vector<float>* x, const std::vector<float>& add,
                        const std::vector<float>& w, int32_t T, int32_t H, float eps,
                        std::vector<float>* h) {
  DeviceArray<float> dx, da, dw;
  DeviceArray<bf16> dh;
  SP_RETURN_IF_ERROR(Put(*x, &dx));
  SP_RETURN_IF_ERROR(Put(add, &da));
  SP_RETURN_IF_ERROR(Put(w, &dw));
  SP_RETURN_IF_ERROR(dh.Allocate(static_cast<size_t>(T) * H));
  SP_RETURN_IF_ERROR(Sync(LaunchAddRmsNorm(dx.get(), add.empty() ? nullptr : da.get(), dw.get(), T,
                                           H, eps, dh.get(), nullptr)));
  SP_RETURN_IF_ERROR(Get(dx, x->size(), x));
  return GetBf16(dh, static_cast<size_t>(T) * H, h);
}

absl::Status QkvPost(const std::vector<float>& qkv, const std::vector<float>& bias,
                     const std::vector<float>& q_norm, const std::vector<float>& k_norm,
                     const std::vector<float>& positions, const std::vector<float>& inv_freq,
                     const std::vector<int32_t>& slots, int32_t qh, int32_t kvh, int32_t D,
                     float eps, std::vector<float>* q, std::vector<float>* k_pool,
                     std::vector<float>* v_pool) {
  const int32_t T = static_cast<int32_t>(positions.size());
  DeviceArray<float> dqkv, db, dqn, dkn, dpos, dinv, dq;
  DeviceArray<int32_t> dslots;
  DeviceArray<bf16> dk, dv;
  SP_RETURN_IF_ERROR(Put(qkv, &dqkv));
  SP_RETURN_IF_ERROR(Put(bias, &db));
  SP_RETURN_IF_ERROR(Put(q_norm, &dqn));
  SP_RETURN_IF_ERROR(Put(k_norm, &dkn));
  SP_RETURN_IF_ERROR(Put(positions, &dpos));
  SP_RETURN_IF_ERROR(Put(inv_freq, &dinv));
  SP_RETURN_IF_ERROR(Put(slots, &dslots));
  SP_RETURN_IF_ERROR(PutBf16(*k_pool, &dk));
  SP_RETURN_IF_ERROR(PutBf16(*v_pool, &dv));
  SP_RETURN_IF_ERROR(dq.Allocate(static_cast<size_t>(T) * qh * D));
  SP_RETURN_IF_ERROR(Sync(LaunchQkvPost(
      dqkv.get(), bias.empty() ? nullptr : db.get(), q_norm.empty() ? nullptr : dqn.get(),
      k_norm.empty() ? nullptr : dkn.get(), dpos.get(), dinv.get(), dslots.get(), T, qh, kvh, D,
      eps, dq.get(), dk.get(), dv.get(), nullptr)));
  SP_RETURN_IF_ERROR(Get(dq, static_cast<size_t>(T) * qh * D, q));
  SP_RETURN_IF_ERROR(GetBf16(dk, k_pool->size(), k_pool));
  return GetBf16(dv, v_pool->size(), v_pool);
}

namespace {
// The inputs and output of an attention kernel on the device.
struct AttentionOnDevice {
  DeviceArray<float> q;
  DeviceArray<bf16> k, v, out;
  DeviceArray<int32_t> keys;
  DeviceArray<AttnTile> tiles;
  size_t n = 0;  // output elements
  absl::Status Upload(const std::vector<float>& q_in, const std::vector<float>& k_pool,
                      const std::vector<float>& v_pool, const std::vector<int32_t>& keys_in,
                      const std::vector<AttnTile>& tiles_in, int32_t T, int32_t qh, int32_t D) {
    SP_RETURN_IF_ERROR(Put(q_in, &q));
    SP_RETURN_IF_ERROR(PutBf16(k_pool, &k));
    SP_RETURN_IF_ERROR(PutBf16(v_pool, &v));
    SP_RETURN_IF_ERROR(Put(keys_in, &keys));
    SP_RETURN_IF_ERROR(Put(tiles_in, &tiles));
    n = static_cast<size_t>(T) * qh * D;
    SP_RETURN_IF_ERROR(out.Allocate(n));
    SP_CUDA_RETURN_IF_ERROR(cudaMemset(out.get(), 0, n * sizeof(bf16)));
    return absl::OkStatus();
  }
};

// The SIMT or the tensor-core kernel on the same inputs.
absl::Status RunAttention(bool tensor_core, const std::vector<float>& q,
                          const std::vector<float>& k_pool, const std::vector<float>& v_pool,
                          const std::vector<int32_t>& keys, const std::vector<AttnTile>& tiles,
                          int32_t max_tile_tokens, int32_t T, int32_t qh, int32_t kvh, int32_t D,
                          float scale, std::vector<float>* out) {
  AttentionOnDevice a;
  SP_RETURN_IF_ERROR(a.Upload(q, k_pool, v_pool, keys, tiles, T, qh, D));
  const int32_t num_tiles = static_cast<int32_t>(tiles.size());
  if (tensor_core) {
    SP_CUDA_RETURN_IF_ERROR(PrepareTcAttention(D));
    SP_RETURN_IF_ERROR(Sync(LaunchTcAttention(a.q.get(), a.k.get(), a.v.get(), a.keys.get(),
                                              a.tiles.get(), num_tiles, max_tile_tokens, qh, kvh, D,
                                              scale, a.out.get(), nullptr)));
  } else {
    SP_CUDA_RETURN_IF_ERROR(
        PrepareAttention(AttentionSharedBytes(max_tile_tokens * (qh / kvh), D)));
    SP_RETURN_IF_ERROR(
        Sync(LaunchAttention(a.q.get(), a.k.get(), a.v.get(), a.keys.get(), a.tiles.get(),
                             num_tiles, max_tile_tokens, qh, kvh, D, scale, a.out.get(), nullptr)));
  }
  return GetBf16(a.out, a.n, out);
}
}  // namespace

absl::Status SplitAttention(const std::vector<float>& q, const std::vector<float>& k_pool,
                            const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                            const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                            int32_t qh, int32_t kvh, int32_t D, float scale, int32_t nsplit,
                            int32_t min_keys, std::vector<float>* out) {
  AttentionOnDevice a;
  SP_RETURN_IF_ERROR(a.Upload(q, k_pool, v_pool, keys, tiles, T, qh, D));
  const int32_t num_tiles = static_cast<int32_t>(tiles.size());
  const size_t ws_floats = static_cast<size_t>(num_tiles) * kvh * nsplit *
                           SplitPartialFloats(max_tile_tokens * (qh / kvh), D);
  DeviceArray<float> ws;
  SP_RETURN_IF_ERROR(ws.Allocate(ws_floats));
  // NaN-filled: a partial read before it is written shows up.
  SP_CUDA_RETURN_IF_ERROR(cudaMemset(ws.get(), 0xFF, ws_floats * sizeof(float)));
  SP_CUDA_RETURN_IF_ERROR(
      PrepareSplitAttention(AttentionSharedBytes(max_tile_tokens * (qh / kvh), D)));
  SP_RETURN_IF_ERROR(Sync(LaunchSplitAttention(
      a.q.get(), a.k.get(), a.v.get(), a.keys.get(), a.tiles.get(), num_tiles, max_tile_tokens, qh,
      kvh, D, scale, nsplit, min_keys, ws.get(), a.out.get(), nullptr)));
  return GetBf16(a.out, a.n, out);
}

absl::Status Attention(const std::vector<float>& q, const std::vector<float>& k_pool,
                       const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                       const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                       int32_t qh, int32_t kvh, int32_t D, float scale, std::vector<float>* out) {
  return RunAttention(false, q, k_pool, v_pool, keys, tiles, max_tile_tokens, T, qh, kvh, D, scale,
                      out);
}

absl::Status TcAttention(const std::vector<float>& q, const std::vector<float>& k_pool,
                         const std::vector<float>& v_pool, const std::vector<int32_t>& keys,
                         const std::vector<AttnTile>& tiles, int32_t max_tile_tokens, int32_t T,
                         int32_t qh, int32_t kvh, int32_t D, float scale, std::vector<float>* out) {
  return RunAttention(true, q, k_pool, v_pool, keys, tiles, max_tile_tokens, T, qh, kvh, D, scale,
                      out);
}

absl::Status SwiGlu(const std::vector<float>& gu, int32_t T, int32_t I, std::vector<float>* act) {
  DeviceArray<float> dgu;
  DeviceArray<bf16> dact;
  SP_RETURN_IF_ERROR(Put(gu, &dgu));
  SP_RETURN_IF_ERROR(dact.Allocate(static_cast<size_t>(T) * I));
  SP_RETURN_IF_ERROR(Sync(LaunchSwiGlu(dgu.get(), T, I, dact.get(), nullptr)));
  return GetBf16(dact, static_cast<size_t>(T) * I, act);
}

absl::Status Gemm(const std::vector<float>& x, const std::vector<float>& w, int32_t rows,
                  int32_t in, int32_t out, std::vector<float>* y) {
  DeviceArray<bf16> dx, dw;
  DeviceArray<float> dy;
  SP_RETURN_IF_ERROR(PutBf16(x, &dx));
  SP_RETURN_IF_ERROR(PutBf16(w, &dw));
  SP_RETURN_IF_ERROR(dy.Allocate(static_cast<size_t>(rows) * out));
  cublasHandle_t handle = nullptr;
  SP_CUBLAS_RETURN_IF_ERROR(cublasCreate(&handle));
  absl::Status st = GemmBf16(handle, dx.get(), rows, in, dw.get(), out, dy.get());
  if (st.ok()) st = Sync(cudaGetLastError());
  cublasDestroy(handle);
  SP_RETURN_IF_ERROR(st);
  return Get(dy, static_cast<size_t>(rows) * out, y);
}

absl::Status Logprobs(const std::vector<float>& logits, int32_t V, const std::vector<int32_t>& rows,
                      const std::vector<int32_t>& targets, std::vector<float>* out) {
  DeviceArray<float> dl, dout;
  DeviceArray<int32_t> dr, dt;
  SP_RETURN_IF_ERROR(Put(logits, &dl));
  SP_RETURN_IF_ERROR(Put(rows, &dr));
  SP_RETURN_IF_ERROR(Put(targets, &dt));
  const int32_t n = static_cast<int32_t>(rows.size());
  SP_RETURN_IF_ERROR(dout.Allocate(n));
  SP_RETURN_IF_ERROR(Sync(LaunchLogprobs(dl.get(), V, dr.get(), dt.get(), n, dout.get(), nullptr)));
  return Get(dout, n, out);
}

absl::Status TopLogits(const std::vector<float>& logits, int32_t V,
                       const std::vector<int32_t>& rows, const std::vector<int32_t>& ns,
                       std::vector<std::vector<int32_t>>* ids,
                       std::vector<std::vector<float>>* top_logits, std::vector<float>* lse) {
  DeviceArray<float> dl, dlogit, dlse;
  DeviceArray<int32_t> dr, dn, did;
  SP_RETURN_IF_ERROR(Put(logits, &dl));
  SP_RETURN_IF_ERROR(Put(rows, &dr));
  SP_RETURN_IF_ERROR(Put(ns, &dn));
  const int32_t R = static_cast<int32_t>(rows.size());
  SP_RETURN_IF_ERROR(did.Allocate(static_cast<size_t>(R) * kTopMax));
  SP_RETURN_IF_ERROR(dlogit.Allocate(static_cast<size_t>(R) * kTopMax));
  SP_RETURN_IF_ERROR(dlse.Allocate(R));
  SP_RETURN_IF_ERROR(Sync(LaunchTopLogits(dl.get(), V, dr.get(), dn.get(), R, did.get(),
                                          dlogit.get(), dlse.get(), nullptr)));
  std::vector<int32_t> all_ids(static_cast<size_t>(R) * kTopMax);
  std::vector<float> all_logits;
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpy(all_ids.data(), did.get(), all_ids.size() * sizeof(int32_t),
                                     cudaMemcpyDeviceToHost));
  SP_RETURN_IF_ERROR(Get(dlogit, static_cast<size_t>(R) * kTopMax, &all_logits));
  SP_RETURN_IF_ERROR(Get(dlse, R, lse));
  ids->assign(R, {});
  top_logits->assign(R, {});
  for (int32_t r = 0; r < R; ++r) {
    (*ids)[r].assign(all_ids.begin() + r * kTopMax, all_ids.begin() + r * kTopMax + ns[r]);
    (*top_logits)[r].assign(all_logits.begin() + r * kTopMax,
                            all_logits.begin() + r * kTopMax + ns[r]);
  }
  return absl::OkStatus();
}

absl::Status SampleRows(const std::vector<float>& logits, int32_t V,
                        const std::vector<int32_t>& rows,
                        const std::vector<engine::RowSampling>& params,
                        std::vector<int32_t>* tokens, std::vector<float>* token_logits) {
  DeviceArray<float> dl, dlogit;
  DeviceArray<int32_t> dr, dtok;
  DeviceArray<engine::RowSampling> dp;
  SP_RETURN_IF_ERROR(Put(logits, &dl));
  SP_RETURN_IF_ERROR(Put(rows, &dr));
  SP_RETURN_IF_ERROR(Put(params, &dp));
  const int32_t R = static_cast<int32_t>(rows.size());
  SP_RETURN_IF_ERROR(dtok.Allocate(R));
  SP_RETURN_IF_ERROR(dlogit.Allocate(R));
  SP_RETURN_IF_ERROR(Sync(
      LaunchSampleRows(dl.get(), V, dr.get(), dp.get(), R, dtok.get(), dlogit.get(), nullptr)));
  tokens->resize(R);
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(tokens->data(), dtok.get(), R * sizeof(int32_t), cudaMemcpyDeviceToHost));
  return Get(dlogit, R, token_logits);
}

}  // namespace superpose::cuda::check
