// LoRA adapters in the PEFT layout (papers.md 3.3, 3.7): a directory with
// adapter_config.json (r, lora_alpha, target_modules, base_model_name_or_path) and
// adapter_model.safetensors holding, per targeted projection of each layer,
//   base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_A.weight  [r, in]
//   base_model.model.model.layers.N.<self_attn|mlp>.<module>.lora_B.weight  [out, r]
// in float32, bfloat16 or float16. A projection y = W x becomes y = W x + scale B (A x)
// with scale = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora). The adapter is
// read whole and widened to float32; each backend takes the part it computes
// (Backend::LoadAdapter).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/config.h"

namespace superpose::engine {

// The projections an adapter may target, in the order the layer computes them.
enum LoraModule : int32_t { kLoraQ, kLoraK, kLoraV, kLoraO, kLoraGate, kLoraUp, kLoraDown };
inline constexpr int32_t kNumLoraModules = 7;
inline constexpr int32_t kMaxLoraRank = 64;
// "q_proj", "k_proj", ..., "down_proj".
const char* LoraModuleName(int32_t module);

// Input and output widths of a module's base weight W[out, in] in `config`.
struct LoraDims {
  int64_t in = 0, out = 0;
};
LoraDims LoraModuleDims(const ModelConfig& config, int32_t module);

// A and B of one (layer, module); both empty when the module is not adapted there.
struct LoraMatrices {
  std::vector<float> a;  // [rank, in]
  std::vector<float> b;  // [out, rank]
  bool empty() const { return a.empty(); }
};

struct LoraAdapter {
  int32_t rank = 0;
  float alpha = 0.0f;
  float scale = 0.0f;      // alpha / rank (alpha / sqrt(rank) with use_rslora)
  std::string base_model;  // base_model_name_or_path, as written (informational)
  std::vector<std::array<LoraMatrices, kNumLoraModules>> layers;  // one per model layer
  // Bytes of A and B in float32.
  int64_t bytes() const;
  // Names of the modules adapted in at least one layer.
  std::vector<std::string> modules() const;
};

// A request's hold on a loaded adapter (engine/runtime/adapters.h, AdapterManager::Acquire):
// while one lives the adapter stays in the backend. `id` is what plans carry
// (SeqPlan::adapter) and what the prefix and path caches are keyed by: unique per
// adapter added to a server, kept when it is evicted and reloaded from the same path.
struct AdapterRef {
  int64_t id = 0;
  std::string name;
};

// Reads and checks an adapter for `config`. Errors name the file and the field or tensor:
// a missing or malformed adapter_config.json, r outside [1, kMaxLoraRank], an unknown
// target module, an unknown tensor name, a layer past the model, a shape that does not
// match the model, a targeted module without its tensors.
absl::StatusOr<LoraAdapter> LoadPeftAdapter(const std::string& dir, const ModelConfig& config);

// Writes `adapter` to `dir` (created if absent) in the PEFT layout, tensors in `dtype`
// (tests and benchmarks make adapters with it).
absl::Status WritePeftAdapter(const std::string& dir, const LoraAdapter& adapter, DType dtype);

// An adapter of `rank` on `modules` of every layer with A, B uniform in [-amp, amp]
// from `seed` (tests, benchmarks). b_zero: B = 0.
LoraAdapter RandomLoraAdapter(const ModelConfig& config, int32_t rank, float alpha,
                              const std::vector<int32_t>& modules, uint64_t seed, float amp,
                              bool b_zero = false);

}  // namespace superpose::engine
