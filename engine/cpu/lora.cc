#include "engine/cpu/lora.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace superpose::engine::cpu {
namespace {

// Sum of a[i] * x[i] over 16 lane-wise partial sums and a fixed reduction tree: the
// same arithmetic for a row whatever else the step holds.
float Dot16(const float* a, const float* x, int32_t n) {
  float acc[16] = {};
  int32_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int32_t l = 0; l < 16; ++l) acc[l] += a[i + l] * x[i + l];
  }
  for (int32_t l = 0; i < n; ++i, ++l) acc[l] += a[i] * x[i];
  for (int32_t w = 8; w >= 1; w /= 2) {
    for (int32_t l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// Rows [r0, r1) x cols [c0, c1) of the row-major [*, cols] matrix m.
std::vector<float> Block(const std::vector<float>& m, int64_t cols, int64_t r0, int64_t r1,
                         int64_t c0, int64_t c1) {
  std::vector<float> out;
  out.reserve(static_cast<size_t>((r1 - r0) * (c1 - c0)));
  for (int64_t r = r0; r < r1; ++r) {
    out.insert(out.end(), m.begin() + r * cols + c0, m.begin() + r * cols + c1);
  }
  return out;
}

std::vector<float> Transpose(const std::vector<float>& m, int64_t rows, int64_t cols) {
  std::vector<float> t(m.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  }
  return t;
}

// The part of module m of a layer for this rank: A's columns [c0, c1) and B's rows
// [r0, r1); its outputs land at `offset` of the site's output row.
LoraProj Part(const LoraAdapter& adapter, const LoraMatrices& p, const LoraDims& d, int64_t c0,
              int64_t c1, int64_t r0, int64_t r1, int32_t offset) {
  const int64_t r = adapter.rank;
  LoraProj proj;
  proj.rank = adapter.rank;
  proj.in = static_cast<int32_t>(c1 - c0);
  proj.out = static_cast<int32_t>(r1 - r0);
  proj.offset = offset;
  proj.scale = adapter.scale;
  proj.a = Block(p.a, d.in, 0, r, c0, c1);
  proj.bt = Transpose(Block(p.b, r, r0, r1, 0, r), r1 - r0, r);
  return proj;
}

}  // namespace

std::shared_ptr<const CpuLora> ShardLora(const LoraAdapter& adapter, const ModelConfig& config,
                                         const LoraShard& s) {
  const int64_t D = config.head_dim;
  const int64_t q0 = int64_t{s.rank} * s.q_heads * D, q1 = q0 + int64_t{s.q_heads} * D;
  const int64_t k0 = int64_t{s.kv_head_begin} * D, k1 = k0 + int64_t{s.kv_heads} * D;
  const int64_t i0 = int64_t{s.rank} * s.inter, i1 = i0 + s.inter;
  const int32_t qd = static_cast<int32_t>(q1 - q0), kvd = static_cast<int32_t>(k1 - k0);
  auto lora = std::make_shared<CpuLora>();
  lora->layers.resize(adapter.layers.size());
  for (size_t l = 0; l < adapter.layers.size(); ++l) {
    auto& sites = lora->layers[l];
    for (int32_t m = 0; m < kNumLoraModules; ++m) {
      const LoraMatrices& p = adapter.layers[l][m];
      if (p.empty()) continue;
      const LoraDims d = LoraModuleDims(config, m);
      LoraProj proj;
      LoraSite site = LoraSite::kQkv;
      switch (m) {
        case kLoraQ:
          proj = Part(adapter, p, d, 0, d.in, q0, q1, 0);
          break;
        case kLoraK:
          proj = Part(adapter, p, d, 0, d.in, k0, k1, qd);
          break;
        case kLoraV:
          proj = Part(adapter, p, d, 0, d.in, k0, k1, qd + kvd);
          break;
        case kLoraO:
          site = LoraSite::kO;
          proj = Part(adapter, p, d, q0, q1, 0, d.out, 0);
          break;
        case kLoraGate:
          site = LoraSite::kGateUp;
          proj = Part(adapter, p, d, 0, d.in, i0, i1, 0);
          break;
        case kLoraUp:
          site = LoraSite::kGateUp;
          proj = Part(adapter, p, d, 0, d.in, i0, i1, s.inter);
          break;
        default:
          site = LoraSite::kDown;
          proj = Part(adapter, p, d, i0, i1, 0, d.out, 0);
          break;
      }
      lora->bytes += static_cast<int64_t>(proj.a.size() + proj.bt.size()) * sizeof(float);
      sites[static_cast<int32_t>(site)].push_back(std::move(proj));
    }
  }
  return lora;
}

absl::Status LoraTable::Load(int64_t id, std::shared_ptr<const CpuLora> lora) {
  if (id <= 0) return absl::InvalidArgumentError("adapter id must be > 0");
  absl::MutexLock lock(&mu_);
  if (!map_.emplace(id, std::move(lora)).second) {
    return absl::AlreadyExistsError(absl::StrCat("adapter ", id, " is already loaded"));
  }
  return absl::OkStatus();
}

absl::Status LoraTable::Unload(int64_t id) {
  absl::MutexLock lock(&mu_);
  if (map_.erase(id) == 0) return absl::NotFoundError(absl::StrCat("adapter ", id, " not loaded"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::shared_ptr<const CpuLora>>> LoraTable::Resolve(
    const BatchPlan& plan) const {
  std::vector<std::shared_ptr<const CpuLora>> out(plan.seqs.size());
  bool any = false;
  for (const SeqPlan& s : plan.seqs) any |= s.adapter != 0;
  if (!any) return out;
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < plan.seqs.size(); ++i) {
    const int64_t id = plan.seqs[i].adapter;
    if (id == 0) continue;
    auto it = map_.find(id);
    if (it == map_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("plan: seq ", plan.seqs[i].id, " names adapter ", id, ", not loaded"));
    }
    out[i] = it->second;
  }
  return out;
}

int64_t LoraTable::bytes() const {
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (const auto& [id, lora] : map_) n += lora->bytes;
  return n;
}

void LoraStep::SetRows(const std::vector<int32_t>& begin, const std::vector<int32_t>& count) {
  rows_.clear();
  for (size_t s = 0; s < per_seq_.size() && s < begin.size(); ++s) {
    if (per_seq_[s] == nullptr) continue;
    for (int32_t r = begin[s]; r < begin[s] + count[s]; ++r)
      rows_.push_back({r, per_seq_[s].get()});
  }
}

void LoraStep::Apply(LoraSite site, int32_t layer, const float* x, float* y,
                     int32_t y_width) const {
  if (rows_.empty()) return;
  const int32_t n = static_cast<int32_t>(rows_.size());
#pragma omp parallel if (n > 1)
  {
    std::vector<float> t, u;
#pragma omp for schedule(static)
    for (int32_t i = 0; i < n; ++i) {
      const auto [row, lora] = rows_[i];
      for (const LoraProj& p : lora->layers[layer][static_cast<int32_t>(site)]) {
        const float* xr = x + static_cast<size_t>(row) * p.in;
        t.resize(p.rank);
        for (int32_t k = 0; k < p.rank; ++k) {
          t[k] = Dot16(&p.a[static_cast<size_t>(k) * p.in], xr, p.in);
        }
        u.assign(p.out, 0.0f);
        for (int32_t k = 0; k < p.rank; ++k) {
          const float tk = t[k];
          const float* bk = &p.bt[static_cast<size_t>(k) * p.out];
          for (int32_t j = 0; j < p.out; ++j) u[j] += tk * bk[j];
        }
        float* yr = y + static_cast<size_t>(row) * y_width + p.offset;
        for (int32_t j = 0; j < p.out; ++j) yr[j] += p.scale * u[j];
      }
    }
  }
}

}  // namespace superpose::engine::cpu
