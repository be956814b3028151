#include "engine/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "engine/cpu/elementwise.h"
#include "engine/cpu/small_gemm.h"
#include "engine/cpu/thread_communicator.h"
#include "engine/lazy.h"
#include "engine/tensor_parallel.h"
#include "engine/util/status.h"

namespace superpose::engine::cpu {

CpuBackend::CpuBackend(const BackendOptions& options, const CpuOptions& cpu, Communicator* comm)
    : options_(options), cpu_(cpu), comm_(comm) {}

absl::Status CpuBackend::CheckShard(const Shard& shard) const {
  if (comm_ == nullptr) {
    if (shard.whole()) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        "cpu backend without a communicator loads the whole model (Shard{}), not rank ", shard.rank,
        " of ", shard.size));
  }
  if (shard.size != comm_->size() || shard.rank != comm_->rank()) {
    return absl::InvalidArgumentError(absl::StrCat("shard rank ", shard.rank, " of ", shard.size,
                                                   " does not match the communicator's rank ",
                                                   comm_->rank(), " of ", comm_->size()));
  }
  return absl::OkStatus();
}

// Weight type: bf16 when asked, or (auto) when the checkpoint stores bf16, on every CPU
// (AMX, AVX512-BF16, or widening to float32 in registers: each streams half the bytes
// of float32, and decode is bound by that); float32 otherwise. Quantized (int8 / q4) for
// a quantized checkpoint (auto) or when asked of a float one (quantized at load);
// float32 or bf16 asked of a quantized checkpoint read its dequantized values.
absl::Status CpuBackend::ChooseWeightType(const WeightSource& weights) {
  const WeightQuant stored = config_.quantization;
  quant_ = WeightQuant::kNone;
  bf16_ = false;
  switch (cpu_.dtype) {
    case WeightDType::kBFloat16:
      bf16_ = true;
      return absl::OkStatus();
    case WeightDType::kFloat32:
      return absl::OkStatus();
    case WeightDType::kInt8:
    case WeightDType::kQ4:
      quant_ = cpu_.dtype == WeightDType::kInt8 ? WeightQuant::kInt8 : WeightQuant::kQ4;
      if (stored != WeightQuant::kNone && stored != quant_) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--cpu_dtype=", WeightQuantName(quant_), ": the checkpoint is already quantized (",
            WeightQuantName(stored), "); use --cpu_dtype=auto or a float checkpoint"));
      }
      return absl::OkStatus();
    case WeightDType::kAuto:
      break;
  }
  quant_ = stored;
  absl::StatusOr<TensorView> probe = weights.Get("model.layers.0.mlp.down_proj.weight");
  bf16_ = quant_ == WeightQuant::kNone && probe.ok() && probe->dtype == DType::kBF16;
  return absl::OkStatus();
}

absl::Status CpuBackend::ReadEmbeddingAndHead(const ShardedWeightReader& reader,
                                              const QuantWeightReader* quant) {
  const int32_t H = config_.hidden_size, vocab_pad = reader.layout().vocab_pad;
  embed_.assign(static_cast<size_t>(vocab_pad) * H, 0.0f);
  SP_RETURN_IF_ERROR(reader.Embedding(embed_.data()));
  lm_head_ = Matrix{};
  if (!config_.tie_word_embeddings && quant != nullptr) {
    SP_RETURN_IF_ERROR(quant->LmHead(&lm_head_.quant));
    lm_head_.out = vocab_pad;
    lm_head_.in = H;
  } else if (!config_.tie_word_embeddings) {
    SP_RETURN_IF_ERROR(reader.LmHead(Shape(lm_head_, vocab_pad, H)));
    Finish(lm_head_);
  } else if (bf16_) {
    lm_head_.out = vocab_pad;
    lm_head_.in = H;
    lm_head_.bf16.Pack(embed_.data(), vocab_pad, H);
  }
  final_norm_.resize(H);
  return reader.FinalNorm(final_norm_.data());
}

absl::Status CpuBackend::ReadLayer(const ShardedWeightReader& reader,
                                   const QuantWeightReader* quant, int32_t l) {
  const int32_t H = config_.hidden_size, D = config_.head_dim;
  const int32_t qkv_rows = static_cast<int32_t>(reader.qkv_rows());
  Layer& L = layers_[l];
  L.attn_norm.resize(H);
  L.mlp_norm.resize(H);
  SP_RETURN_IF_ERROR(reader.AttnNorm(l, L.attn_norm.data()));
  SP_RETURN_IF_ERROR(reader.MlpNorm(l, L.mlp_norm.data()));
  if (config_.attention_bias) {
    L.bqkv.resize(qkv_rows);
    SP_RETURN_IF_ERROR(reader.QkvBias(l, L.bqkv.data()));
  }
  if (config_.qk_norm) {
    L.q_norm.resize(D);
    L.k_norm.resize(D);
    SP_RETURN_IF_ERROR(reader.QNorm(l, L.q_norm.data()));
    SP_RETURN_IF_ERROR(reader.KNorm(l, L.k_norm.data()));
  }
  if (quant != nullptr) {
    SP_RETURN_IF_ERROR(quant->Qkv(l, &L.wqkv.quant));
    SP_RETURN_IF_ERROR(quant->O(l, &L.wo.quant));
    SP_RETURN_IF_ERROR(quant->GateUp(l, &L.wgate_up.quant));
    SP_RETURN_IF_ERROR(quant->Down(l, &L.wdown.quant));
    for (Matrix* m : {&L.wqkv, &L.wo, &L.wgate_up, &L.wdown}) {
      m->out = m->quant.out;
      m->in = m->quant.in;
    }
    return absl::OkStatus();
  }
  SP_RETURN_IF_ERROR(reader.Qkv(l, Shape(L.wqkv, qkv_rows, H)));
  Finish(L.wqkv);
  SP_RETURN_IF_ERROR(reader.O(l, Shape(L.wo, H, q_heads_ * D)));
  Finish(L.wo);
  SP_RETURN_IF_ERROR(reader.GateUp(l, Shape(L.wgate_up, 2 * inter_, H)));
  Finish(L.wgate_up);
  SP_RETURN_IF_ERROR(reader.Down(l, Shape(L.wdown, H, inter_)));
  Finish(L.wdown);
  return absl::OkStatus();
}

void CpuBackend::AllocateKvPool() {
  switch (cpu_.kv_cache_dtype) {
    case KvCacheDType::kAuto:
      kv_bf16_ = bf16_;
      break;
    case KvCacheDType::kFloat32:
      kv_bf16_ = false;
      break;
    case KvCacheDType::kBFloat16:
      kv_bf16_ = true;
      break;
  }
  const int32_t D = config_.head_dim;
  const int32_t bs = options_.kv_block_size > 0 ? options_.kv_block_size : 16;
  const int64_t elem = kv_bf16_ ? 2 : 4;
  const int64_t per_block =
      static_cast<int64_t>(config_.num_layers) * bs * kv_heads_ * D * 2 * elem;
  int32_t blocks = options_.kv_num_blocks;
  if (blocks <= 0) {
    blocks = static_cast<int32_t>(std::max<int64_t>(1, options_.kv_memory_bytes / per_block));
  }
  kv_info_ = KvPoolInfo{blocks, bs, per_block, kv_bf16_ ? "bfloat16" : "float32"};
  const size_t kv_elems = static_cast<size_t>(config_.num_layers) * blocks * bs * kv_heads_ * D;
  k_cache_.clear();
  v_cache_.clear();
  k_cache16_.clear();
  v_cache16_.clear();
  if (kv_bf16_) {
    k_cache16_.assign(kv_elems, 0);
    v_cache16_.assign(kv_elems, 0);
  } else {
    k_cache_.assign(kv_elems, 0.0f);
    v_cache_.assign(kv_elems, 0.0f);
  }
}

absl::Status CpuBackend::Load(const ModelConfig& config, const WeightSource& weights,
                              const Shard& shard) {
  SP_RETURN_IF_ERROR(CheckShard(shard));
  config_ = config;
  shard_ = shard;
  absl::StatusOr<ShardedWeightReader> reader = ShardedWeightReader::Create(config_, weights, shard);
  if (!reader.ok()) return reader.status();
  const ShardLayout& layout = reader->layout();
  q_heads_ = layout.q_heads;
  kv_heads_ = layout.kv_heads;
  kv_head_begin_ = layout.kv_head_begin;
  inter_ = layout.inter;
  vocab_begin_ = layout.vocab_begin;
  vocab_local_ = layout.vocab_local;
  const int32_t group = config.num_heads / config.num_kv_heads;
  heads_of_.assign(kv_heads_, {});
  for (int32_t h = 0; h < q_heads_; ++h) {
    heads_of_[(shard.rank * q_heads_ + h) / group - kv_head_begin_].push_back(h);
  }
  SP_RETURN_IF_ERROR(ChooseWeightType(weights));
  std::optional<QuantWeightReader> quant;
  if (quant_ != WeightQuant::kNone) quant.emplace(config_, weights, shard, layout, quant_);
  const QuantWeightReader* q = quant ? &*quant : nullptr;
  SP_RETURN_IF_ERROR(ReadEmbeddingAndHead(*reader, q));
  layers_.clear();
  layers_.resize(config.num_layers);
  // A layer that shares another's weights (config.layer_weight_map) reads none of its own.
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (config.WeightLayer(l) == l) SP_RETURN_IF_ERROR(ReadLayer(*reader, q, l));
  }
  inv_freq_ = RopeInvFreq(config);
  AllocateKvPool();
  return absl::OkStatus();
}

float* CpuBackend::Shape(Matrix& m, int32_t out, int32_t in) {
  m.out = out;
  m.in = in;
  m.f32.assign(static_cast<size_t>(out) * in, 0.0f);
  return m.f32.data();
}

void CpuBackend::Finish(Matrix& m) const {
  if (!bf16_) return;
  m.bf16.Pack(m.f32.data(), m.out, m.in);
  AlignedFloats().swap(m.f32);
}

void CpuBackend::Linear(const float* x, int32_t rows, const Matrix& m, float* y) const {
  if (!m.quant.empty()) {
    QuantGemm(x, rows, m.quant, y);
  } else if (m.bf16.empty()) {
    LinearF32(x, rows, m.in, m.f32.data(), m.out, y);
  } else {
    Bf16Gemm(x, rows, m.bf16, y);
  }
}

void CpuBackend::LinearF32(const float* x, int32_t rows, int32_t in, const float* w, int32_t out,
                           float* y) const {
  // Our kernel at every row count, never sgemm: OpenBLAS rounds a row differently by its
  // place in the matrix (edge tiles) and by the thread count (the k blocking), so the
  // same sequence would score differently in different batches and at different
  // --threads. SmallBatchGemm computes each output the same way whatever the call.
  SmallBatchGemm(x, rows, in, w, out, y);
}

absl::Status CpuBackend::AllReduce(float* data, int64_t count) {
  if (comm_ == nullptr) return absl::OkStatus();
  return comm_->AllReduceSum(data, count);
}

CpuBackend::ActiveRows CpuBackend::AllRows(const BatchPlan& plan) {
  ActiveRows rows;
  rows.token.resize(plan.tokens.size());
  for (size_t t = 0; t < rows.token.size(); ++t) rows.token[t] = static_cast<int32_t>(t);
  rows.slot = plan.kv_slots;
  rows.compact.assign(plan.tokens.size(), -1);
  rows.prefix.assign(plan.tokens.size(), -1);
  rows.own.assign(plan.tokens.size(), -1);
  for (const SeqPlan& seq : plan.seqs) {
    rows.begin.push_back(seq.token_begin);
    rows.count.push_back(seq.num_tokens);
    rows.stage.push_back(0);
    if (!seq.lazy.revives()) continue;
    for (int32_t j = 0; j < seq.num_tokens; ++j) {
      rows.own[seq.token_begin + j] = seq.lazy.own_begin + j;
    }
  }
  return rows;
}

CpuBackend::KeyIndex CpuBackend::BuildKeyIndex(const BatchPlan& plan,
                                               const ActiveRows& rows) const {
  const int32_t bs = kv_info_.block_size;
  const int32_t S = static_cast<int32_t>(plan.seqs.size());
  KeyIndex ix;
  ix.keys.resize(S);
  std::vector<int32_t> ctx_len(S);
  for (int32_t si = 0; si < S; ++si) {
    const SeqPlan& seq = plan.seqs[si];
    AttnKeys& keys = ix.keys[si];
    // A lazy sequence past its first boundary sees the context of its stage.
    const int32_t stage = rows.stage[si];
    if (stage > 0 && seq.lazy.by_entries()) continue;  // RevivalKeys
    for (const KvSegment& g : stage == 0 ? seq.context : seq.lazy.stage_context[stage - 1]) {
      keys.Append(g.block, g.first_slot, g.length, bs);
    }
    ctx_len[si] = static_cast<int32_t>(keys.slots.size());
    for (int32_t j = 0; j < rows.count[si]; ++j) {
      const KvSlot& s = rows.slot[rows.begin[si] + j];
      keys.Append(s.block, s.slot, 1, bs);
    }
  }
  // Work items: the query heads of one kv head for a tile of rows (up to 32 queries),
  // with each query's row in q/out and its visible key count.
  for (int32_t si = 0; si < S; ++si) {
    if (rows.stage[si] > 0 && plan.seqs[si].lazy.by_entries()) {
      RevivalKeys(plan.seqs[si], rows, si, &ix);
      continue;
    }
    const int32_t n = rows.count[si];
    for (int32_t kvh = 0; kvh < kv_heads_; ++kvh) {
      const int32_t g = static_cast<int32_t>(heads_of_[kvh].size());
      if (g == 0) continue;
      const int32_t tile = std::max(1, 32 / g);
      for (int32_t r0 = 0; r0 < n; r0 += tile) {
        AttnItem item{si, kvh, static_cast<int32_t>(ix.query_row.size()), 0};
        for (int32_t r = r0; r < std::min(r0 + tile, n); ++r) {
          for (int32_t h : heads_of_[kvh]) {
            ix.query_row.push_back(static_cast<int64_t>(rows.begin[si] + r) * q_heads_ + h);
            ix.query_nk.push_back(ctx_len[si] + r + 1);
          }
        }
        item.count = static_cast<int32_t>(ix.query_row.size()) - item.first;
        ix.items.push_back(item);
      }
    }
  }
  return ix;
}

// q: [T, q_heads, D] (after RoPE). out: [T, q_heads, D]. Keys/values of this layer are
// already in the pool for every new token. Every token, decode or prefill, goes through
// the same kernel (attention.h), so its output does not depend on the step's shape.
void CpuBackend::Attention(const KeyIndex& ix, int32_t layer, const float* q, float* out) const {
  const int32_t D = config_.head_dim, bs = kv_info_.block_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t layer_off = static_cast<size_t>(layer) * kv_info_.num_blocks * bs * kv_heads_ * D;
  const void* k = kv_bf16_ ? static_cast<const void*>(k_cache16_.data() + layer_off)
                           : static_cast<const void*>(k_cache_.data() + layer_off);
  const void* v = kv_bf16_ ? static_cast<const void*>(v_cache16_.data() + layer_off)
                           : static_cast<const void*>(v_cache_.data() + layer_off);
  const KvLayerView view{k, v, kv_heads_, D, bs, kv_bf16_};
  const std::vector<AttnItem>& items = ix.items;
#pragma omp parallel if (items.size() > 1)
  {
    AttnScratch scratch;
    std::vector<const float*> qs;
    std::vector<float*> outs;
#pragma omp for schedule(dynamic, 1)
    for (size_t it = 0; it < items.size(); ++it) {
      const AttnItem& item = items[it];
      qs.resize(item.count);
      outs.resize(item.count);
      for (int32_t i = 0; i < item.count; ++i) {
        const size_t row = static_cast<size_t>(ix.query_row[item.first + i]) * D;
        qs[i] = q + row;
        outs[i] = out + row;
      }
      Attend(view, item.kvh, ix.keys[item.seq], item.count, qs.data(), &ix.query_nk[item.first],
             scale, outs.data(), &scratch);
    }
  }
}

absl::Status CpuBackend::Forward(const BatchPlan& plan, ForwardOutput* out) {
  SP_RETURN_IF_ERROR(ValidatePlan(plan, kv_info_, config_.vocab_size));
  SP_RETURN_IF_ERROR(ValidateLazyPlan(plan, kv_info_, config_.num_layers));
  // OpenMP's thread count is per calling thread: set it on the thread that runs us.
  if (options_.num_threads > 0) omp_set_num_threads(options_.num_threads);
  const int32_t T = plan.num_tokens();
  out->logits.clear();
  out->logprobs.clear();
  out->lazy.clear();
  if (T == 0) return absl::OkStatus();
  std::vector<float> x;
  SP_RETURN_IF_ERROR(Embed(plan, &x));
  // Where each sequence's keys live: the same for every layer of a stage (LazyLLM
  // sequences change stage, and may drop rows, after their boundary layers).
  ActiveRows rows = AllRows(plan);
  KeyIndex key_index = BuildKeyIndex(plan, rows);
  absl::StatusOr<std::vector<std::shared_ptr<const CpuLora>>> adapters = lora_table_.Resolve(plan);
  if (!adapters.ok()) return adapters.status();
  lora_step_ = LoraStep(*std::move(adapters));
  lora_step_.SetRows(rows.begin, rows.count);
  LazyStep lazy;
  StartLazy(plan, &lazy, out);
  StepBuffers b(plan, config_, q_heads_, kv_heads_, inter_, inv_freq_);
  for (int32_t l = 0; l < config_.num_layers; ++l) {
    SP_RETURN_IF_ERROR(AttentionBlock(plan, rows, key_index, l, &b, &x));
    const bool boundary = AnyBoundary(plan, rows, l);
    if (boundary) SP_RETURN_IF_ERROR(LazyScores(plan, key_index, rows, l, b.q.data(), &lazy));
    SP_RETURN_IF_ERROR(MlpBlock(l, &b, &x));
    LazyCount(rows, l, lazy, out);
    if (boundary) {
      LazyPrune(plan, l, &lazy, &rows, &x, out, &b);
      b.Fit(rows.token.size());  // tokens revived from the Aux Cache add rows
      key_index = BuildKeyIndex(plan, rows);
      lora_step_.SetRows(rows.begin, rows.count);
    }
  }
  lora_step_ = LoraStep();  // the adapters this step held may be unloaded now
  return Logits(plan, rows, x, out);
}

CpuBackend::StepBuffers::StepBuffers(const BatchPlan& plan, const ModelConfig& config,
                                     int32_t q_heads, int32_t kv_heads, int32_t inter,
                                     const std::vector<float>& inv_freq) {
  const size_t T = plan.tokens.size(), H = config.hidden_size, D = config.head_dim;
  const size_t qd = q_heads * D, qkv_w = qd + 2 * kv_heads * D;
  const size_t sizes[7] = {
      H, qkv_w, qd, qd, H, 2 * static_cast<size_t>(inter), static_cast<size_t>(inter)};
  std::copy(sizes, sizes + 7, per_row);
  Fit(T);
  // RoPE tables from the float positions.
  half = static_cast<int32_t>(D / 2);
  this->inv_freq = &inv_freq;
  cos_t.reserve(T * half);
  sin_t.reserve(T * half);
  for (size_t t = 0; t < T; ++t) AddRow(plan.positions[t]);
}

int32_t CpuBackend::StepBuffers::AddRow(float position) {
  const int32_t id = static_cast<int32_t>(cos_t.size() / half);
  for (int32_t i = 0; i < half; ++i) {
    const float a = position * (*inv_freq)[i];
    cos_t.push_back(std::cos(a));
    sin_t.push_back(std::sin(a));
  }
  return id;
}

void CpuBackend::StepBuffers::Fit(size_t rows) {
  std::vector<float>* bufs[7] = {&h, &qkv, &q, &attn, &proj, &gu, &act};
  for (int i = 0; i < 7; ++i) {
    if (bufs[i]->size() < rows * per_row[i]) bufs[i]->resize(rows * per_row[i]);
  }
}

// Embedding (vocabulary-parallel: rows outside this rank's range stay zero).
absl::Status CpuBackend::Embed(const BatchPlan& plan, std::vector<float>* x) {
  const int32_t T = plan.num_tokens(), H = config_.hidden_size;
  x->assign(static_cast<size_t>(T) * H, 0.0f);
  for (int32_t t = 0; t < T; ++t) {
    const int32_t id = plan.tokens[t] - vocab_begin_;
    if (id >= 0 && id < vocab_local_) {
      std::memcpy(&(*x)[static_cast<size_t>(t) * H], &embed_[static_cast<size_t>(id) * H],
                  sizeof(float) * H);
    }
  }
  return AllReduce(x->data(), x->size());
}

// Norm, QKV projection, RoPE, K/V into the pool, attention, output projection, residual.
absl::Status CpuBackend::AttentionBlock(const BatchPlan& plan, const ActiveRows& rows,
                                        const KeyIndex& key_index, int32_t l, StepBuffers* b,
                                        std::vector<float>* xp) {
  const int32_t T = static_cast<int32_t>(rows.token.size());
  const int32_t H = config_.hidden_size, D = config_.head_dim, bs = kv_info_.block_size;
  const int32_t qd = q_heads_ * D, kvd = kv_heads_ * D, qkv_w = qd + 2 * kvd, half = b->half;
  const float eps = config_.rms_norm_eps;
  const Layer& L = layers_[config_.WeightLayer(l)];
  std::vector<float>& x = *xp;
  std::vector<float>&h = b->h, &qkv = b->qkv, &q = b->q, &attn = b->attn, &proj = b->proj;
  const std::vector<float>&cos_t = b->cos_t, &sin_t = b->sin_t;
#pragma omp parallel for if (T > 4)
  for (int32_t t = 0; t < T; ++t) {
    RmsNorm(&x[static_cast<size_t>(t) * H], L.attn_norm.data(), H, eps,
            &h[static_cast<size_t>(t) * H]);
  }
  Linear(h.data(), T, L.wqkv, qkv.data());
  lora_step_.Apply(LoraSite::kQkv, l, h.data(), qkv.data(), qkv_w);  // LoRA: engine/cpu/lora.h
  const size_t layer_off = static_cast<size_t>(l) * kv_info_.num_blocks * bs * kvd;
#pragma omp parallel for if (T > 4)
  for (int32_t t = 0; t < T; ++t) {
    float* row = &qkv[static_cast<size_t>(t) * qkv_w];
    if (!L.bqkv.empty()) {
      for (int32_t i = 0; i < qkv_w; ++i) row[i] += L.bqkv[i];
    }
    const int32_t tok = rows.token[t];  // rows are plan tokens (LazyLLM drops some)
    const float* c = &cos_t[static_cast<size_t>(tok) * half];
    const float* s = &sin_t[static_cast<size_t>(tok) * half];
    for (int32_t hh = 0; hh < q_heads_; ++hh) {
      float* qh = &q[(static_cast<size_t>(t) * q_heads_ + hh) * D];
      std::memcpy(qh, row + hh * D, sizeof(float) * D);
      if (!L.q_norm.empty()) RmsNorm(qh, L.q_norm.data(), D, eps, qh);
      Rope(qh, c, s, D);
    }
    const KvSlot& slot = rows.slot[t];
    const size_t voff = layer_off + (static_cast<size_t>(slot.block) * bs + slot.slot) * kvd;
    const float* vsrc = row + qd + kvd;
    if (kv_bf16_) {
      for (int32_t i = 0; i < kvd; ++i) v_cache16_[voff + i] = F32ToBf16(vsrc[i]);
    } else {
      std::memcpy(&v_cache_[voff], vsrc, sizeof(float) * kvd);
    }
    for (int32_t hh = 0; hh < kv_heads_; ++hh) {
      float* kh = row + qd + hh * D;
      if (!L.k_norm.empty()) RmsNorm(kh, L.k_norm.data(), D, eps, kh);
      Rope(kh, c, s, D);
      for (int32_t d = 0; d < D; ++d) {
        const size_t e = layer_off + KeyElement(slot.block, slot.slot, hh, d, kv_heads_, D, bs);
        if (kv_bf16_) {
          k_cache16_[e] = F32ToBf16(kh[d]);
        } else {
          k_cache_[e] = kh[d];
        }
      }
    }
  }
  Attention(key_index, l, q.data(), attn.data());
  Linear(attn.data(), T, L.wo, proj.data());
  lora_step_.Apply(LoraSite::kO, l, attn.data(), proj.data(), H);  // before the all-reduce
  SP_RETURN_IF_ERROR(AllReduce(proj.data(), x.size()));
  for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  return absl::OkStatus();
}

// Norm, gate/up projection, SwiGLU, down projection, residual.
absl::Status CpuBackend::MlpBlock(int32_t l, StepBuffers* b, std::vector<float>* xp) {
  std::vector<float>& x = *xp;
  const int32_t H = config_.hidden_size;
  const int32_t T = static_cast<int32_t>(x.size() / H);
  const float eps = config_.rms_norm_eps;
  const Layer& L = layers_[config_.WeightLayer(l)];
  std::vector<float>&h = b->h, &gu = b->gu, &act = b->act, &proj = b->proj;
#pragma omp parallel for if (T > 4)
  for (int32_t t = 0; t < T; ++t) {
    RmsNorm(&x[static_cast<size_t>(t) * H], L.mlp_norm.data(), H, eps,
            &h[static_cast<size_t>(t) * H]);
  }
  Linear(h.data(), T, L.wgate_up, gu.data());
  lora_step_.Apply(LoraSite::kGateUp, l, h.data(), gu.data(), 2 * inter_);
#pragma omp parallel for if (T > 4)
  for (int32_t t = 0; t < T; ++t) {
    const float* g = &gu[static_cast<size_t>(t) * 2 * inter_];
    SwiGlu(g, g + inter_, inter_, &act[static_cast<size_t>(t) * inter_]);
  }
  Linear(act.data(), T, L.wdown, proj.data());
  lora_step_.Apply(LoraSite::kDown, l, act.data(), proj.data(), H);  // before the all-reduce
  SP_RETURN_IF_ERROR(AllReduce(proj.data(), x.size()));
  for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  return absl::OkStatus();
}

// Logits of the rows that want them: logits_for first, then those of logprob requests.
absl::Status CpuBackend::Logits(const BatchPlan& plan, const ActiveRows& active,
                                const std::vector<float>& x, ForwardOutput* out) {
  const int32_t T = plan.num_tokens(), H = config_.hidden_size;
  // Plan token -> its row of x (tokens LazyLLM pruned have none: ValidateLazyPlan keeps
  // logits and logprob rows off them).
  std::vector<int32_t> x_row(T, -1);
  for (size_t r = 0; r < active.token.size(); ++r) {
    if (active.token[r] < T) x_row[active.token[r]] = static_cast<int32_t>(r);  // else revived
  }
  const float eps = config_.rms_norm_eps;
  std::vector<int32_t> rows = plan.logits_for;
  std::vector<int32_t> lp_row(plan.logprobs.size());
  std::vector<int32_t> row_of(T, -1);
  for (size_t r = 0; r < rows.size(); ++r) row_of[rows[r]] = static_cast<int32_t>(r);
  for (size_t i = 0; i < plan.logprobs.size(); ++i) {
    const int32_t t = plan.logprobs[i].token_index;
    if (row_of[t] < 0) {
      row_of[t] = static_cast<int32_t>(rows.size());
      rows.push_back(t);
    }
    lp_row[i] = row_of[t];
  }
  if (rows.empty()) return absl::OkStatus();
  const int32_t R = static_cast<int32_t>(rows.size());
  std::vector<float> hn(static_cast<size_t>(R) * H);
  for (int32_t r = 0; r < R; ++r) {
    if (x_row[rows[r]] < 0) return absl::InternalError("a logits row of a pruned token");
    RmsNorm(&x[static_cast<size_t>(x_row[rows[r]]) * H], final_norm_.data(), H, eps,
            &hn[static_cast<size_t>(r) * H]);
  }
  absl::StatusOr<const float*> logits = LmHead(hn, R);
  if (!logits.ok()) return logits.status();
  CompactLogits(plan, config_.vocab_size, *logits, out);
  Logprobs(plan, *logits, R, lp_row, out);
  return absl::OkStatus();
}

// [R, V] logits of the final-normed rows hn (gathered over the ranks).
absl::StatusOr<const float*> CpuBackend::LmHead(const std::vector<float>& hn, int32_t R) {
  const int32_t H = config_.hidden_size;
  const int32_t V = config_.vocab_size, tp = shard_.size;
  const int32_t vocab_pad = (V + tp - 1) / tp;
  // Scratch kept across steps: scoring steps ask for thousands of rows, and fresh
  // allocations of that size are page-faulted in again every step.
  std::vector<float>& local = lm_local_;
  local.resize(static_cast<size_t>(R) * vocab_pad);
  if (lm_head_.out == 0) {  // tied, float32: the embedding table is the head
    LinearF32(hn.data(), R, H, embed_.data(), vocab_pad, local.data());
  } else {
    Linear(hn.data(), R, lm_head_, local.data());
  }
  std::vector<float>& logits = tp == 1 ? lm_local_ : lm_full_;
  if (tp > 1) {
    logits.resize(static_cast<size_t>(R) * V);
    std::vector<float> gathered(static_cast<size_t>(tp) * R * vocab_pad);
    SP_RETURN_IF_ERROR(comm_->AllGather(local.data(), local.size(), gathered.data()));
    for (int32_t rk = 0; rk < tp; ++rk) {
      const int32_t v0 = std::min(V, rk * vocab_pad), v1 = std::min(V, v0 + vocab_pad);
      for (int32_t r = 0; r < R; ++r) {
        std::memcpy(&logits[static_cast<size_t>(r) * V + v0],
                    &gathered[(static_cast<size_t>(rk) * R + r) * vocab_pad],
                    sizeof(float) * (v1 - v0));
      }
    }
  }
  return static_cast<const float*>(logits.data());
}

void CpuBackend::Logprobs(const BatchPlan& plan, const float* logits, int32_t R,
                          const std::vector<int32_t>& lp_row, ForwardOutput* out) const {
  const int32_t V = config_.vocab_size;
  out->logprobs.resize(plan.logprobs.size());
  // Log-sum-exp of every row that has a log-probability request, in parallel
  // (engine::LogSumExp: the one the compact rows use).
  std::vector<float> lse(R, 0.0f);
  std::vector<char> needs_lse(R, 0);
  for (int32_t r : lp_row) needs_lse[r] = 1;
#pragma omp parallel for schedule(static) if (plan.logprobs.size() > 1)
  for (int32_t r = 0; r < R; ++r) {
    if (!needs_lse[r]) continue;
    lse[r] = LogSumExp(absl::MakeConstSpan(&logits[static_cast<size_t>(r) * V], V));
  }
  for (size_t i = 0; i < plan.logprobs.size(); ++i) {
    const int32_t r = lp_row[i];
    out->logprobs[i] = logits[static_cast<size_t>(r) * V + plan.logprobs[i].target] - lse[r];
  }
}

absl::Status CpuBackend::LoadAdapter(int64_t id, const LoraAdapter& adapter) {
  if (layers_.empty()) return absl::FailedPreconditionError("cpu backend: no model loaded");
  if (adapter.layers.size() != layers_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("adapter has ", adapter.layers.size(),
                                                   " layers; the model has ", layers_.size()));
  }
  const LoraShard shard{shard_.rank, q_heads_, kv_heads_, kv_head_begin_, inter_};
  return lora_table_.Load(id, ShardLora(adapter, config_, shard));
}

std::unique_ptr<Backend> MakeCpuBackend(const BackendOptions& options, const CpuOptions& cpu) {
  const int32_t tp = options.tensor_parallel;
  if (tp <= 1) return std::make_unique<CpuBackend>(options, cpu);
  auto group = std::make_shared<ThreadGroup>(tp);
  std::vector<std::unique_ptr<Backend>> ranks;
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int32_t r = 0; r < tp; ++r) {
    comms.push_back(group->Rank(r));
    BackendOptions o = options;
    // Threads are shared among the ranks.
    if (o.num_threads > 0) o.num_threads = std::max(1, o.num_threads / tp);
    ranks.push_back(std::make_unique<CpuBackend>(o, cpu, comms.back().get()));
  }
  return std::make_unique<TensorParallelBackend>(std::move(ranks), std::move(comms), group);
}

void RegisterBackend(BackendRegistry& registry) {
  registry.Register<CpuOptions>(
      "cpu", ParseCpuOptions,
      [](const BackendOptions& options, const CpuOptions& cpu)
          -> absl::StatusOr<std::unique_ptr<Backend>> { return MakeCpuBackend(options, cpu); });
}

}  // namespace superpose::engine::cpu
