// Model configuration: Hugging Face config.json (+ generation_config.json) for the
// Llama family (Llama 2/3, Mistral, Qwen2, Qwen3 / AFM-style).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace superpose::engine {

// kI8 / kU8: the codes of quantized weights (engine/model/quantize.h), never a torch_dtype.
enum class DType { kF32, kF16, kBF16, kI8, kU8 };
const char* DTypeName(DType d);
size_t DTypeSize(DType d);

// How the checkpoint stores its projection weights (config.json "quantization_config",
// written by superpose-quantize; engine/model/quantize.h): float (kNone), int8 per output
// channel, or 4-bit palettized.
enum class WeightQuant { kNone, kInt8, kQ4 };

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  // llama3 only.
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int32_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // e.g. "LlamaForCausalLM"
  std::string model_type;    // e.g. "llama", "mistral", "qwen2", "qwen3"
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;  // hidden_size / num_heads unless config.json says otherwise
  int32_t vocab_size = 0;
  int32_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool attention_bias = false;  // q/k/v projections have biases (Qwen2)
  bool qk_norm = false;         // per-head RMSNorm of q and k before RoPE (Qwen3, AFM)
  bool tie_word_embeddings = false;
  DType dtype = DType::kF32;           // torch_dtype: the storage dtype of the checkpoint
  // quantization_config: how the projections are stored (engine/model/quantize.h).
  WeightQuant quantization = WeightQuant::kNone;
  int32_t bos_token_id = -1;           // -1: none
  std::vector<int32_t> eos_token_ids;  // union of config.json and generation_config.json
  int32_t pad_token_id = -1;
  // Cross-layer weight sharing (SPIN-style isotropic stacks; config.json
  // "layer_weight_map"): layer l computes with the weights of checkpoint layer
  // layer_weight_map[l], which maps to itself. Empty: every layer has its own. Each
  // layer keeps its own KV cache.
  std::vector<int32_t> layer_weight_map;
  int32_t WeightLayer(int32_t l) const {
    return layer_weight_map.empty() ? l : layer_weight_map[l];
  }
  // Layers with weights of their own (stored once, whatever the sharing).
  int32_t DistinctLayers() const;

  // Stored parameters (a shared layer's weights once).
  int64_t NumParameters() const;
  // Bytes of weights read once per decode step at the given dtype.
  int64_t WeightBytes(DType d) const;
};

// Parses a config.json text; `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json, const std::string& source);
// Merges generation_config.json (eos/bos ids) into `config`.
absl::Status MergeGenerationConfig(std::string_view json, const std::string& source,
                                   ModelConfig* config);
// Reads `dir`/config.json and, when present, `dir`/generation_config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

// RoPE inverse frequencies (head_dim / 2 values) including rope scaling. The angle of
// pair i at (float) position p is p * inv_freq[i]; rotate_half layout (i, i + dim/2).
std::vector<float> RopeInvFreq(const ModelConfig& config);

// Serializes a config back to config.json text (used by the random-model generator).
std::string ModelConfigToJson(const ModelConfig& config);

}  // namespace superpose::engine
