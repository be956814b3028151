#include "engine/lora_shard.h"

#include <utility>

namespace superpose::engine {
namespace {

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

std::shared_ptr<const ShardedLora> ShardLora(const LoraAdapter& adapter, const ModelConfig& config,
                                             const LoraShard& s) {
  const int64_t D = config.head_dim;
  const int64_t q0 = int64_t{s.rank} * s.q_heads * D, q1 = q0 + int64_t{s.q_heads} * D;
  const int64_t k0 = int64_t{s.kv_head_begin} * D, k1 = k0 + int64_t{s.kv_heads} * D;
  const int64_t i0 = int64_t{s.rank} * s.inter, i1 = i0 + s.inter;
  const int32_t qd = static_cast<int32_t>(q1 - q0), kvd = static_cast<int32_t>(k1 - k0);
  auto lora = std::make_shared<ShardedLora>();
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

}  // namespace superpose::engine
