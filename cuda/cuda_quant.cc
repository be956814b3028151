// The CUDA backend's quantized projections (cuda/cuda_quant.h) and the backend's steps
// that use them: the format choice, reading and uploading a rank's matrices, random
// weights, and the projection of a layer or of the LM head.
#include "cuda/cuda_quant.h"

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cuda_backend_impl.h"
#include "engine/cpu/quant_weights.h"
#include "engine/model/quantize.h"
#include "engine/model/weights.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::cuda {

using engine::WeightQuant;

namespace {

int32_t KindOf(WeightQuant q) {
  return q == WeightQuant::kInt8 ? kQuantInt8 : q == WeightQuant::kQ4 ? kQuantQ4 : 0;
}

int32_t Groups(int32_t in) { return (in + kQuantGroup - 1) / kQuantGroup; }

template <typename T>
absl::Status Upload(const std::vector<T>& src, DeviceArray<T>* dst) {
  SP_RETURN_IF_ERROR(dst->Allocate(src.size()));
  if (src.empty()) return absl::OkStatus();
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpy(dst->get(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

// Rows [r0, r1) of y = x * W'^T through bf16 rows of W' in scratch and cuBLAS.
absl::Status DequantChunk(cublasHandle_t handle, cudaStream_t stream, const bf16* x, int32_t T,
                          const DeviceQuant& w, int32_t r0, int32_t r1, bf16* scratch, float* y) {
  const QuantView v = w.view();
  SP_CUDA_RETURN_IF_ERROR(LaunchQuantDequantBf16(v, r0, r1, scratch, stream));
  const float alpha = 1.0f, beta = 0.0f;
  // Column-major: Y^T[r0:r1, T] (ld out) = S[in, r1 - r0]^T * X^T[in, T].
  SP_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, r1 - r0, T, w.in, &alpha,
                                         scratch, CUDA_R_16BF, w.in, x, CUDA_R_16BF, w.in, &beta,
                                         y + r0, CUDA_R_32F, w.out, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

}  // namespace

QuantView DeviceQuant::view() const {
  QuantView v;
  v.kind = kind;
  v.out = out;
  v.in = in;
  v.groups = Groups(in);
  v.row_bytes = kind == kQuantQ4 ? int64_t{v.groups} * (kQuantGroup / 2) : in;
  v.codes = codes.get();
  v.scales = scales.get();
  v.lut = lut.get();
  v.lut_set = lut_set.get();
  return v;
}

int64_t DeviceQuant::bytes() const {
  return static_cast<int64_t>(codes.size() + scales.size() * 4 + lut.size() * 2 +
                              lut_set.size() * 4);
}

absl::Status DeviceQuant::Allocate(int32_t k, int32_t o, int32_t i, int32_t sets) {
  kind = k;
  out = o;
  in = i;
  const QuantView v = view();
  SP_RETURN_IF_ERROR(codes.Allocate(static_cast<size_t>(o) * v.row_bytes));
  scales.Reset();
  lut.Reset();
  lut_set.Reset();
  if (k == kQuantInt8) return scales.Allocate(o);
  SP_RETURN_IF_ERROR(lut.Allocate(static_cast<size_t>(sets) * v.groups * kQuantGroup));
  return lut_set.Allocate(o);
}

absl::Status UploadQuant(const engine::cpu::QuantMatrix& m, DeviceQuant* dst) {
  dst->kind = KindOf(m.kind);
  dst->out = m.out;
  dst->in = m.in;
  SP_RETURN_IF_ERROR(Upload(m.codes, &dst->codes));
  dst->scales.Reset();
  dst->lut.Reset();
  dst->lut_set.Reset();
  if (m.kind == WeightQuant::kInt8) return Upload(m.scales, &dst->scales);
  // The tables hold float16 values widened to float32: back to their float16 bits.
  std::vector<uint16_t> lut(m.lut.size());
  for (size_t i = 0; i < lut.size(); ++i) lut[i] = engine::F32ToF16(m.lut[i]);
  SP_RETURN_IF_ERROR(Upload(lut, &dst->lut));
  return Upload(m.lut_set, &dst->lut_set);
}

absl::Status FillRandomQuant(DeviceQuant& w, uint64_t seed, float scale, cudaStream_t stream) {
  SP_CUDA_RETURN_IF_ERROR(
      LaunchQuantFillRandom(w.codes.get(), static_cast<int64_t>(w.codes.size()), seed, stream));
  if (w.kind == kQuantInt8) {
    SP_CUDA_RETURN_IF_ERROR(LaunchFillF32(w.scales.get(), static_cast<int64_t>(w.scales.size()),
                                          scale / engine::kInt8MaxCode, stream));
    return absl::OkStatus();
  }
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<uint16_t> lut(w.lut.size());
  for (uint16_t& e : lut) e = engine::F32ToF16(u(rng));
  std::vector<int32_t> sets(w.lut_set.size(), 0);
  SP_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(w.lut.get(), lut.data(), lut.size() * 2, cudaMemcpyHostToDevice, stream));
  SP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(w.lut_set.get(), sets.data(), sets.size() * 4,
                                          cudaMemcpyHostToDevice, stream));
  SP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));  // the host vectors go now
  return absl::OkStatus();
}

absl::Status QuantProject(cublasHandle_t handle, cudaStream_t stream, const bf16* x, int32_t T,
                          const DeviceQuant& w, bf16* scratch, size_t scratch_elems, float* y) {
  if (T <= 0 || w.out <= 0) return absl::OkStatus();
  if (T <= kQuantStreamMaxT) {
    SP_CUDA_RETURN_IF_ERROR(LaunchQuantGemv(w.view(), x, T, y, stream));
    return absl::OkStatus();
  }
  const int64_t chunk = std::min<int64_t>(w.out, static_cast<int64_t>(scratch_elems) / w.in);
  if (chunk <= 0) {
    return absl::InternalError(absl::StrCat("quantized projection: scratch of ", scratch_elems,
                                            " elements holds no row of ", w.in));
  }
  for (int32_t r0 = 0; r0 < w.out; r0 += static_cast<int32_t>(chunk)) {
    const int32_t r1 = static_cast<int32_t>(std::min<int64_t>(w.out, r0 + chunk));
    SP_RETURN_IF_ERROR(DequantChunk(handle, stream, x, T, w, r0, r1, scratch, y));
  }
  return absl::OkStatus();
}

absl::StatusOr<WeightQuant> ChooseCudaQuant(CudaDType dtype, WeightQuant stored) {
  switch (dtype) {
    case CudaDType::kAuto:
      return stored;
    case CudaDType::kBf16:
      return WeightQuant::kNone;
    case CudaDType::kInt8:
    case CudaDType::kQ4:
      break;
  }
  const WeightQuant want = dtype == CudaDType::kInt8 ? WeightQuant::kInt8 : WeightQuant::kQ4;
  if (stored != WeightQuant::kNone && stored != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--cuda_dtype=", engine::WeightQuantName(want), ": the checkpoint is already quantized (",
        engine::WeightQuantName(stored), "); use --cuda_dtype=auto or a float checkpoint"));
  }
  return want;
}

// ---- The backend's steps. ----

absl::Status CudaBackend::Impl::ChooseQuant() {
  SP_ASSIGN_OR_RETURN(quant, ChooseCudaQuant(cuda_options.dtype, config.quantization));
  if (quant != WeightQuant::kNone) SP_CUDA_RETURN_IF_ERROR(LoadQuantKernels());
  if (shard.rank == 0) {
    spdlog::info(
        "CUDA weights: projections {}{}",
        quant == WeightQuant::kNone ? "bf16" : engine::WeightQuantName(quant),
        quant != WeightQuant::kNone && !config.tie_word_embeddings ? " (LM head too)" : "");
  }
  return absl::OkStatus();
}

bool CudaBackend::Impl::QuantHead() const {
  return quant != WeightQuant::kNone && !config.tie_word_embeddings;
}

// The largest layer matrix, the prefill path's bf16 scratch (the LM head goes through
// it in chunks of rows). A previous load's quantized head goes.
absl::Status CudaBackend::Impl::AllocateQuantScratch() {
  lm_head_q = DeviceQuant{};
  quant_scratch.Reset();
  if (quant == WeightQuant::kNone) return absl::OkStatus();
  const size_t H = config.hidden_size, D = config.head_dim;
  const size_t qkv_rows = static_cast<size_t>(q_heads + 2 * kv_heads) * D;
  const size_t n = std::max({qkv_rows * H, H * q_heads * D, 2 * static_cast<size_t>(inter) * H});
  return quant_scratch.Allocate(n);
}

absl::Status CudaBackend::Impl::ReadQuantWeights(const WeightSource& weights) {
  absl::StatusOr<engine::ShardLayout> layout = engine::ComputeShardLayout(config, shard);
  if (!layout.ok()) return layout.status();
  const engine::cpu::QuantWeightReader reader(config, weights, shard, *layout, quant);
  engine::cpu::QuantMatrix m;
  auto put = [&](absl::Status read, DeviceQuant* dst) -> absl::Status {
    if (!read.ok()) {
      return absl::Status(read.code(), absl::StrCat("--cuda_dtype=", engine::WeightQuantName(quant),
                                                    ": ", read.message()));
    }
    return UploadQuant(m, dst);
  };
  if (QuantHead()) SP_RETURN_IF_ERROR(put(reader.LmHead(&m), &lm_head_q));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (!OwnsWeights(l)) continue;
    Layer& L = layers[l];
    SP_RETURN_IF_ERROR(put(reader.Qkv(l, &m), &L.wqkv_q));
    SP_RETURN_IF_ERROR(put(reader.O(l, &m), &L.wo_q));
    SP_RETURN_IF_ERROR(put(reader.GateUp(l, &m), &L.wgate_up_q));
    SP_RETURN_IF_ERROR(put(reader.Down(l, &m), &L.wdown_q));
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Impl::FillQuantRandom(uint64_t seed, float scale) {
  if (quant == WeightQuant::kNone) return absl::OkStatus();
  const int32_t kind = KindOf(quant), H = config.hidden_size, D = config.head_dim;
  const int32_t qd = q_heads * D, qkv_rows = qd + 2 * kv_heads * D;
  uint64_t n = 0;
  auto fill = [&](DeviceQuant& w, int32_t out, int32_t in) -> absl::Status {
    SP_RETURN_IF_ERROR(w.Allocate(kind, out, in, 1));
    return FillRandomQuant(w, seed * 7919 + ++n, scale, stream);
  };
  if (QuantHead()) SP_RETURN_IF_ERROR(fill(lm_head_q, vocab_pad, H));
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (!OwnsWeights(l)) continue;
    Layer& L = layers[l];
    SP_RETURN_IF_ERROR(fill(L.wqkv_q, qkv_rows, H));
    SP_RETURN_IF_ERROR(fill(L.wo_q, H, qd));
    SP_RETURN_IF_ERROR(fill(L.wgate_up_q, 2 * inter, H));
    SP_RETURN_IF_ERROR(fill(L.wdown_q, H, inter));
  }
  return absl::OkStatus();
}

int64_t CudaBackend::Impl::QuantWeightBytes() const {
  int64_t n = lm_head_q.bytes();
  for (const Layer& L : layers) {
    n += L.wqkv_q.bytes() + L.wo_q.bytes() + L.wgate_up_q.bytes() + L.wdown_q.bytes();
  }
  return n;
}

absl::Status CudaBackend::Impl::Project(const bf16* x, int32_t T, int32_t in,
                                        const DeviceArray<bf16>& w, const DeviceQuant& wq,
                                        int32_t out, float* y) {
  if (wq.empty()) return GemmBf16(cublas, x, T, in, w.get(), out, y);
  return QuantProject(cublas, stream, x, T, wq, quant_scratch.get(), quant_scratch.size(), y);
}

absl::Status CudaBackend::Impl::LmHead(const bf16* x, int32_t rows, float* y) {
  const bf16* head = lm_head.empty() ? embed.get() : lm_head.get();
  if (lm_head_q.empty()) return GemmBf16(cublas, x, rows, config.hidden_size, head, vocab_pad, y);
  return QuantProject(cublas, stream, x, rows, lm_head_q, quant_scratch.get(), quant_scratch.size(),
                      y);
}

std::string CudaBackend::compute_dtype() const {
  const WeightQuant q = impl_->quant;
  return q == WeightQuant::kNone ? "bfloat16" : engine::WeightQuantName(q);
}

}  // namespace superpose::cuda
