#include "engine/model/config.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/model/quantize.h"
#include "engine/util/status.h"

namespace superpose::engine {

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kF32:
      return "float32";
    case DType::kF16:
      return "float16";
    case DType::kBF16:
      return "bfloat16";
    case DType::kI8:
      return "int8";
    case DType::kU8:
      return "uint8";
  }
  return "unknown";
}

size_t DTypeSize(DType d) {
  switch (d) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kI8:
    case DType::kU8:
      return 1;
  }
  return 0;
}

namespace {

// The parameter count in T: int64_t for NumParameters, double for the parser's check
// that it fits (ParseModelConfig rejects configs above kMaxParameters).
template <typename T>
T ParameterCount(const ModelConfig& c, int32_t layers) {
  const T H = c.hidden_size, I = c.intermediate_size, D = c.head_dim, nq = c.num_heads,
          nkv = c.num_kv_heads, V = c.vocab_size;
  T per_layer = H * nq * D         // q_proj
                + 2 * H * nkv * D  // k_proj, v_proj
                + nq * D * H       // o_proj
                + 3 * H * I        // gate, up, down
                + 2 * H;           // input / post-attention norms
  if (c.attention_bias) per_layer += nq * D + 2 * nkv * D;
  if (c.qk_norm) per_layer += 2 * D;
  T n = V * H + per_layer * static_cast<T>(layers) + H;
  if (!c.tie_word_embeddings) n += V * H;
  return n;
}

// 2^60: WeightBytes (up to 4 bytes each) stays within int64; real models have < 2^42.
constexpr double kMaxParameters = 1152921504606846976.0;

}  // namespace

int32_t ModelConfig::DistinctLayers() const {
  int32_t n = 0;
  for (int32_t l = 0; l < num_layers; ++l) n += WeightLayer(l) == l;
  return n;
}

int64_t ModelConfig::NumParameters() const {
  return ParameterCount<int64_t>(*this, DistinctLayers());
}

int64_t ModelConfig::WeightBytes(DType d) const {
  // Every layer (a shared layer's weights once per use), the final norm and the lm_head
  // (the embedding matrix when tied) are read in full per decode step; the input
  // embedding only contributes one row per token.
  int64_t n = ParameterCount<int64_t>(*this, num_layers);
  if (!tie_word_embeddings) n -= static_cast<int64_t>(vocab_size) * hidden_size;
  return n * static_cast<int64_t>(DTypeSize(d));
}

namespace {

using json = nlohmann::json;

enum class Family { kLlama, kMistral, kQwen2, kQwen3 };

struct ArchInfo {
  const char* architecture;
  const char* model_type;
  Family family;
};

constexpr ArchInfo kArchs[] = {
    {"LlamaForCausalLM", "llama", Family::kLlama},
    {"MistralForCausalLM", "mistral", Family::kMistral},
    {"Qwen2ForCausalLM", "qwen2", Family::kQwen2},
    {"Qwen3ForCausalLM", "qwen3", Family::kQwen3},
};

std::string SupportedArchitectures() {
  std::vector<std::string> names;
  for (const ArchInfo& a : kArchs) names.push_back(a.architecture);
  return absl::StrJoin(names, ", ");
}

const char* JsonTypeName(const json& v) { return v.type_name(); }

// Field readers. Each returns InvalidArgument "<source>: ..." naming the field.
class Reader {
 public:
  Reader(const json& obj, const std::string& source) : obj_(obj), source_(source) {}

  bool Present(const char* key) const {
    auto it = obj_.find(key);
    return it != obj_.end() && !it->is_null();
  }
  const json* Find(const char* key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::Status Missing(const char* key) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": missing field '", key, "'"));
  }
  absl::Status WrongType(const char* key, const char* want, const json& v) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", key, "' must be ", want,
                                                   ", got ", JsonTypeName(v), " ", v.dump()));
  }
  absl::Status Invalid(const std::string& key, const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", key, "' ", why));
  }

  static bool AsInt(const json& v, int64_t* out) {
    if (v.is_number_integer()) {
      *out = v.get<int64_t>();
      return true;
    }
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      *out = static_cast<int64_t>(u);
      return true;
    }
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) {
        *out = static_cast<int64_t>(d);
        return true;
      }
    }
    return false;
  }

  absl::Status Int32(const json& v, const char* key, int32_t* out) const {
    int64_t x = 0;
    if (!AsInt(v, &x)) return WrongType(key, "an integer", v);
    if (x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max()) {
      return Invalid(key, absl::StrCat("is out of range: ", x));
    }
    *out = static_cast<int32_t>(x);
    return absl::OkStatus();
  }

  absl::Status RequiredInt(const char* key, int32_t* out) const {
    const json* v = Find(key);
    if (v == nullptr) return Missing(key);
    return Int32(*v, key, out);
  }
  // Leaves *out unchanged when absent or null.
  absl::Status OptionalInt(const char* key, int32_t* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    return Int32(*v, key, out);
  }
  absl::Status OptionalFloat(const char* key, float* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_number()) return WrongType(key, "a number", *v);
    *out = static_cast<float>(v->get<double>());
    return absl::OkStatus();
  }
  absl::Status OptionalBool(const char* key, bool* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_boolean()) return WrongType(key, "a boolean", *v);
    *out = v->get<bool>();
    return absl::OkStatus();
  }
  absl::Status OptionalString(const char* key, std::string* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return WrongType(key, "a string", *v);
    *out = v->get<std::string>();
    return absl::OkStatus();
  }
  // An int or a list of ints; appends to `out` (no duplicates).
  absl::Status IdList(const char* key, std::vector<int32_t>* out) const {
    const json* v = Find(key);
    if (v == nullptr) return absl::OkStatus();
    std::vector<int32_t> ids;
    if (v->is_array()) {
      for (const json& e : *v) {
        int32_t id = 0;
        if (!e.is_number()) return WrongType(key, "an integer or a list of integers", *v);
        SP_RETURN_IF_ERROR(Int32(e, key, &id));
        ids.push_back(id);
      }
    } else if (v->is_number()) {
      int32_t id = 0;
      SP_RETURN_IF_ERROR(Int32(*v, key, &id));
      ids.push_back(id);
    } else {
      return WrongType(key, "an integer or a list of integers", *v);
    }
    for (int32_t id : ids) {
      bool seen = false;
      for (int32_t e : *out) seen |= e == id;
      if (!seen) out->push_back(id);
    }
    return absl::OkStatus();
  }

 private:
  const json& obj_;
  const std::string& source_;
};

absl::StatusOr<json> ParseJsonObject(std::string_view text, const std::string& source) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Re-parse with exceptions to get the position of the error.
    try {
      json again = json::parse(text.begin(), text.end());
      (void)again;
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON: ", e.what()));
    }
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": expected a JSON object"));
  }
  return j;
}

absl::Status ParseRopeScaling(const json& rs, const std::string& source, const char* field,
                              RopeScaling* out) {
  Reader r(rs, source);
  if (!rs.is_object()) return r.WrongType(field, "null or an object", rs);
  std::string type;
  const char* type_key = r.Present("rope_type") ? "rope_type" : "type";
  {
    const json* t = r.Find(type_key);
    if (t == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field '", field, "' has no 'rope_type' (or 'type')"));
    }
    if (!t->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, ".", type_key,
                                                     "' must be a string, got ", t->dump()));
    }
    type = t->get<std::string>();
  }
  auto sub = [&](const char* key) { return absl::StrCat(field, ".", key); };
  auto read_float = [&](const char* key, bool required, float* v) -> absl::Status {
    const json* x = r.Find(key);
    if (x == nullptr) {
      if (!required) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(source, ": missing field '", sub(key), "'"));
    }
    if (!x->is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field '", sub(key), "' must be a number, got ", x->dump()));
    }
    *v = static_cast<float>(x->get<double>());
    if (!std::isfinite(*v)) {  // e.g. 1e300: +inf as a float
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field '", sub(key), "' must be a finite float, got ", x->dump()));
    }
    return absl::OkStatus();
  };
  RopeScaling s;
  if (type == "default") {
    s.type = RopeScaling::Type::kNone;
  } else if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    SP_RETURN_IF_ERROR(read_float("factor", true, &s.factor));
    if (!(s.factor > 0)) return r.Invalid(sub("factor"), "must be positive");
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::kLlama3;
    SP_RETURN_IF_ERROR(read_float("factor", true, &s.factor));
    SP_RETURN_IF_ERROR(read_float("low_freq_factor", true, &s.low_freq_factor));
    SP_RETURN_IF_ERROR(read_float("high_freq_factor", true, &s.high_freq_factor));
    const json* omp = r.Find("original_max_position_embeddings");
    if (omp == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": missing field '", sub("original_max_position_embeddings"), "'"));
    }
    int64_t v = 0;
    if (!Reader::AsInt(*omp, &v) || v <= 0 || v > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": field '", sub("original_max_position_embeddings"),
                       "' must be a positive integer, got ", omp->dump()));
    }
    s.original_max_position_embeddings = static_cast<int32_t>(v);
    if (!(s.factor > 0)) return r.Invalid(sub("factor"), "must be positive");
    if (!(s.low_freq_factor > 0)) return r.Invalid(sub("low_freq_factor"), "must be positive");
    if (!(s.high_freq_factor > s.low_freq_factor)) {
      return r.Invalid(sub("high_freq_factor"), "must be greater than low_freq_factor");
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field '", field, "' has rope type '", type,
                     "', which is not supported (supported: null, \"linear\", \"llama3\")"));
  }
  *out = s;
  return absl::OkStatus();
}

// The architecture named by 'architectures' (or, without it, 'model_type').
absl::StatusOr<const ArchInfo*> ReadArchitecture(const Reader& r, const std::string& source,
                                                 ModelConfig* out) {
  ModelConfig& c = *out;
  // Architecture / model type.
  const ArchInfo* arch = nullptr;
  std::string model_type;
  SP_RETURN_IF_ERROR(r.OptionalString("model_type", &model_type));
  if (const json* archs = r.Find("architectures")) {
    if (!archs->is_array()) return r.WrongType("architectures", "a list of strings", *archs);
    for (const json& a : *archs) {
      if (!a.is_string()) return r.WrongType("architectures", "a list of strings", *archs);
      for (const ArchInfo& k : kArchs) {
        if (arch == nullptr && a.get<std::string>() == k.architecture) arch = &k;
      }
    }
    if (arch == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": field 'architectures' ", archs->dump(),
          " names no supported architecture (supported: ", SupportedArchitectures(), ")"));
    }
  } else {
    if (model_type.empty()) return r.Missing("architectures");
    for (const ArchInfo& k : kArchs) {
      if (model_type == k.model_type) arch = &k;
    }
    if (arch == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": no field 'architectures' and field 'model_type' \"", model_type,
                       "\" is not supported (supported: llama, mistral, qwen2, qwen3)"));
    }
  }

  c.architecture = arch->architecture;
  c.model_type = model_type.empty() ? arch->model_type : model_type;
  return arch;
}

// Sizes, norm epsilon and RoPE base.
absl::Status ReadShape(const Reader& r, Family family, ModelConfig* out) {
  ModelConfig& c = *out;
  SP_RETURN_IF_ERROR(r.RequiredInt("hidden_size", &c.hidden_size));
  SP_RETURN_IF_ERROR(r.RequiredInt("intermediate_size", &c.intermediate_size));
  SP_RETURN_IF_ERROR(r.RequiredInt("num_hidden_layers", &c.num_layers));
  SP_RETURN_IF_ERROR(r.RequiredInt("num_attention_heads", &c.num_heads));
  SP_RETURN_IF_ERROR(r.RequiredInt("vocab_size", &c.vocab_size));
  SP_RETURN_IF_ERROR(r.RequiredInt("max_position_embeddings", &c.max_position_embeddings));
  c.num_kv_heads = c.num_heads;
  SP_RETURN_IF_ERROR(r.OptionalInt("num_key_value_heads", &c.num_kv_heads));
  if (family == Family::kQwen3) {
    SP_RETURN_IF_ERROR(r.RequiredInt("head_dim", &c.head_dim));
  } else {
    c.head_dim = 0;
    SP_RETURN_IF_ERROR(r.OptionalInt("head_dim", &c.head_dim));
  }

  c.rms_norm_eps = 1e-6f;  // the transformers default of all four families
  SP_RETURN_IF_ERROR(r.OptionalFloat("rms_norm_eps", &c.rms_norm_eps));
  c.rope_theta = 10000.0f;
  SP_RETURN_IF_ERROR(r.OptionalFloat("rope_theta", &c.rope_theta));

  return absl::OkStatus();
}

// rope_scaling (transformers < 5) or rope_parameters (transformers >= 5, which also
// holds rope_theta).
absl::Status ReadRope(const Reader& r, const std::string& source, ModelConfig* out) {
  ModelConfig& c = *out;
  if (const json* rs = r.Find("rope_scaling")) {
    SP_RETURN_IF_ERROR(ParseRopeScaling(*rs, source, "rope_scaling", &c.rope_scaling));
  } else if (const json* rp = r.Find("rope_parameters")) {
    if (!rp->is_object()) return r.WrongType("rope_parameters", "an object", *rp);
    Reader rr(*rp, source);
    if (!r.Present("rope_theta") && rr.Present("rope_theta")) {
      const json& t = (*rp)["rope_theta"];
      if (!t.is_number()) return r.WrongType("rope_parameters.rope_theta", "a number", t);
      c.rope_theta = static_cast<float>(t.get<double>());
    }
    if (rr.Present("rope_type") || rr.Present("type")) {
      SP_RETURN_IF_ERROR(ParseRopeScaling(*rp, source, "rope_parameters", &c.rope_scaling));
    }
  }

  return absl::OkStatus();
}

// Biases, norms, dtype, special token ids, activation.
absl::Status ReadFeatures(const Reader& r, Family family, ModelConfig* out) {
  ModelConfig& c = *out;
  // Biases and norms by family.
  SP_RETURN_IF_ERROR(r.OptionalBool("attention_bias", &c.attention_bias));
  if (family == Family::kQwen2) {
    c.attention_bias = true;  // Qwen2: q/k/v always have biases, o_proj never
  } else if (c.attention_bias) {
    return r.Invalid("attention_bias",
                     "is true: biases on all four attention projections (o_proj included) "
                     "are not supported for " +
                         c.architecture);
  }
  bool mlp_bias = false;
  SP_RETURN_IF_ERROR(r.OptionalBool("mlp_bias", &mlp_bias));
  if (mlp_bias) return r.Invalid("mlp_bias", "is true: MLP biases are not supported");
  c.qk_norm = family == Family::kQwen3;

  SP_RETURN_IF_ERROR(r.OptionalBool("tie_word_embeddings", &c.tie_word_embeddings));

  std::string dtype;
  const char* dtype_key = r.Present("torch_dtype") ? "torch_dtype" : "dtype";
  SP_RETURN_IF_ERROR(r.OptionalString(dtype_key, &dtype));
  if (dtype.empty() || dtype == "float32") {
    c.dtype = DType::kF32;
  } else if (dtype == "bfloat16") {
    c.dtype = DType::kBF16;
  } else if (dtype == "float16") {
    c.dtype = DType::kF16;
  } else {
    return r.Invalid(dtype_key,
                     absl::StrCat("is \"", dtype, "\", not one of float32, bfloat16, float16"));
  }

  c.bos_token_id = -1;
  SP_RETURN_IF_ERROR(r.OptionalInt("bos_token_id", &c.bos_token_id));
  SP_RETURN_IF_ERROR(r.IdList("eos_token_id", &c.eos_token_ids));
  c.pad_token_id = -1;
  SP_RETURN_IF_ERROR(r.OptionalInt("pad_token_id", &c.pad_token_id));

  std::string act = "silu";
  SP_RETURN_IF_ERROR(r.OptionalString("hidden_act", &act));
  if (act != "silu") {
    return r.Invalid("hidden_act", absl::StrCat("is \"", act, "\"; only \"silu\" is supported"));
  }

  return absl::OkStatus();
}

// Sliding-window attention is not implemented: accept it only when it never applies.
absl::Status CheckSlidingWindow(const Reader& r, Family family, const ModelConfig& c) {
  if (const json* sw = r.Find("sliding_window")) {
    bool used = family == Family::kMistral;
    if (family == Family::kQwen2 || family == Family::kQwen3) {
      SP_RETURN_IF_ERROR(r.OptionalBool("use_sliding_window", &used));
    }
    if (used) {
      int32_t window = 0;
      SP_RETURN_IF_ERROR(r.Int32(*sw, "sliding_window", &window));
      if (window < c.max_position_embeddings) {
        return r.Invalid("sliding_window",
                         absl::StrCat("is ", window,
                                      ": sliding_window attention shorter than "
                                      "max_position_embeddings (",
                                      c.max_position_embeddings, ") is not supported"));
      }
    }
  }

  return absl::OkStatus();
}

// "layer_weight_map": one checkpoint layer per layer, each mapping to itself (so that
// its tensors are stored under its own index).
absl::Status ReadLayerWeightMap(const Reader& r, ModelConfig* out) {
  const json* m = r.Find("layer_weight_map");
  if (m == nullptr || m->is_null()) return absl::OkStatus();
  const int32_t L = out->num_layers;
  if (!m->is_array() || static_cast<int64_t>(m->size()) != L) {
    return r.Invalid("layer_weight_map",
                     absl::StrCat("must be a list of num_hidden_layers (", L, ") layer indices"));
  }
  std::vector<int32_t> map;
  for (const json& v : *m) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= L) {
      return r.Invalid("layer_weight_map",
                       absl::StrCat("entry ", map.size(), " is not a layer index in [0, ", L, ")"));
    }
    map.push_back(static_cast<int32_t>(v.get<int64_t>()));
  }
  for (int32_t l = 0; l < L; ++l) {
    if (map[map[l]] != map[l]) {
      return r.Invalid("layer_weight_map", absl::StrCat("layer ", l, " uses layer ", map[l],
                                                        ", which itself uses layer ", map[map[l]],
                                                        " (a shared layer must map to itself)"));
    }
  }
  out->layer_weight_map = std::move(map);
  return absl::OkStatus();
}

absl::Status CheckConsistency(const Reader& r, ModelConfig* out) {
  ModelConfig& c = *out;
  auto positive = [&](const char* key, int32_t v) -> absl::Status {
    if (v <= 0) return r.Invalid(key, absl::StrCat("must be positive, got ", v));
    return absl::OkStatus();
  };
  SP_RETURN_IF_ERROR(positive("hidden_size", c.hidden_size));
  SP_RETURN_IF_ERROR(positive("intermediate_size", c.intermediate_size));
  SP_RETURN_IF_ERROR(positive("num_hidden_layers", c.num_layers));
  SP_RETURN_IF_ERROR(positive("num_attention_heads", c.num_heads));
  SP_RETURN_IF_ERROR(positive("num_key_value_heads", c.num_kv_heads));
  SP_RETURN_IF_ERROR(positive("vocab_size", c.vocab_size));
  SP_RETURN_IF_ERROR(positive("max_position_embeddings", c.max_position_embeddings));
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_heads != 0) {
      return r.Invalid("hidden_size",
                       absl::StrCat(c.hidden_size, " is not divisible by num_attention_heads ",
                                    c.num_heads, " (and there is no head_dim)"));
    }
    c.head_dim = c.hidden_size / c.num_heads;
  }
  SP_RETURN_IF_ERROR(positive("head_dim", c.head_dim));
  if (c.head_dim % 2 != 0) {
    return r.Invalid("head_dim", absl::StrCat("must be even for RoPE, got ", c.head_dim));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return r.Invalid(
        "num_key_value_heads",
        absl::StrCat(c.num_kv_heads, " does not divide num_attention_heads ", c.num_heads));
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return r.Invalid("rms_norm_eps", "must be positive");
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return r.Invalid("rope_theta", "must be positive");
  }
  // Each size fits int32, but their products need not fit int64 (NumParameters).
  if (const double n = ParameterCount<double>(c, c.num_layers); n > kMaxParameters) {
    return r.Invalid("hidden_size",
                     absl::StrCat("(with intermediate_size, num_hidden_layers, vocab_size and "
                                  "the head counts) gives ",
                                  n, " parameters, more than 2^60"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view text, const std::string& source) {
  try {
    SP_ASSIGN_OR_RETURN(json j, ParseJsonObject(text, source));
    Reader r(j, source);
    ModelConfig c;
    SP_ASSIGN_OR_RETURN(const ArchInfo* arch, ReadArchitecture(r, source, &c));
    SP_RETURN_IF_ERROR(ReadShape(r, arch->family, &c));
    SP_RETURN_IF_ERROR(ReadRope(r, source, &c));
    SP_RETURN_IF_ERROR(ReadFeatures(r, arch->family, &c));
    SP_RETURN_IF_ERROR(CheckSlidingWindow(r, arch->family, c));
    SP_RETURN_IF_ERROR(CheckConsistency(r, &c));
    SP_RETURN_IF_ERROR(ReadLayerWeightMap(r, &c));
    SP_RETURN_IF_ERROR(ReadQuantizationConfig(j, source, &c.quantization));
    return c;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

absl::Status MergeGenerationConfig(std::string_view text, const std::string& source,
                                   ModelConfig* config) {
  try {
    SP_ASSIGN_OR_RETURN(json j, ParseJsonObject(text, source));
    Reader r(j, source);
    std::vector<int32_t> eos = config->eos_token_ids;
    SP_RETURN_IF_ERROR(r.IdList("eos_token_id", &eos));
    int32_t bos = config->bos_token_id;
    if (bos < 0) SP_RETURN_IF_ERROR(r.OptionalInt("bos_token_id", &bos));
    int32_t pad = config->pad_token_id;
    if (pad < 0) SP_RETURN_IF_ERROR(r.OptionalInt("pad_token_id", &pad));
    config->eos_token_ids = std::move(eos);
    config->bos_token_id = bos;
    config->pad_token_id = pad;
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", e.what()));
  }
}

namespace {

// NOT_FOUND when absent.
absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (", std::strerror(errno), ")"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ss.str();
}

}  // namespace

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  SP_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  SP_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, path));
  const std::string gen_path = dir + "/generation_config.json";
  std::ifstream probe(gen_path);
  if (probe.good()) {
    probe.close();
    SP_ASSIGN_OR_RETURN(std::string gen, ReadTextFile(gen_path));
    SP_RETURN_IF_ERROR(MergeGenerationConfig(gen, gen_path, &config));
  }
  return config;
}

std::vector<float> RopeInvFreq(const ModelConfig& config) {
  const int32_t dim = config.head_dim;
  const int32_t half = dim / 2;
  std::vector<float> out(half > 0 ? half : 0);
  const double base = config.rope_theta;
  const RopeScaling& rs = config.rope_scaling;
  for (int32_t i = 0; i < half; ++i) {
    // transformers: 1 / base ** (arange(0, dim, 2) / dim)
    double inv = 1.0 / std::pow(base, static_cast<double>(2 * i) / dim);
    if (rs.type == RopeScaling::Type::kLinear) {
      inv /= rs.factor;
    } else if (rs.type == RopeScaling::Type::kLlama3) {
      // transformers `_compute_llama3_parameters`.
      const double factor = rs.factor, low = rs.low_freq_factor, high = rs.high_freq_factor;
      const double old_len = rs.original_max_position_embeddings;
      const double low_freq_wavelen = old_len / low;
      const double high_freq_wavelen = old_len / high;
      const double wavelen = 2.0 * M_PI / inv;
      if (wavelen > low_freq_wavelen) {
        inv = inv / factor;
      } else if (!(wavelen < high_freq_wavelen)) {
        const double smooth = (old_len / wavelen - low) / (high - low);
        inv = (1.0 - smooth) * inv / factor + smooth * inv;
      }
    }
    out[i] = static_cast<float>(inv);
  }
  return out;
}

namespace {

// The shortest decimal that reads back as the same float, as a JSON number.
json FloatJson(float f) {
  if (!std::isfinite(f)) return json(static_cast<double>(f));
  char buf[64];
  for (int prec = 6; prec <= 9; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, static_cast<double>(f));
    if (std::strtof(buf, nullptr) == f) break;
  }
  return json(std::strtod(buf, nullptr));
}

}  // namespace

std::string ModelConfigToJson(const ModelConfig& c) {
  try {
    nlohmann::ordered_json j;
    j["architectures"] = {c.architecture};
    j["model_type"] = c.model_type;
    j["hidden_act"] = "silu";
    j["hidden_size"] = c.hidden_size;
    j["intermediate_size"] = c.intermediate_size;
    j["num_hidden_layers"] = c.num_layers;
    j["num_attention_heads"] = c.num_heads;
    j["num_key_value_heads"] = c.num_kv_heads;
    j["head_dim"] = c.head_dim;
    j["vocab_size"] = c.vocab_size;
    j["max_position_embeddings"] = c.max_position_embeddings;
    j["rms_norm_eps"] = FloatJson(c.rms_norm_eps);
    j["rope_theta"] = FloatJson(c.rope_theta);
    switch (c.rope_scaling.type) {
      case RopeScaling::Type::kNone:
        j["rope_scaling"] = nullptr;
        break;
      case RopeScaling::Type::kLinear:
        j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", FloatJson(c.rope_scaling.factor)}};
        break;
      case RopeScaling::Type::kLlama3: {
        nlohmann::ordered_json rs;
        rs["rope_type"] = "llama3";
        rs["factor"] = FloatJson(c.rope_scaling.factor);
        rs["low_freq_factor"] = FloatJson(c.rope_scaling.low_freq_factor);
        rs["high_freq_factor"] = FloatJson(c.rope_scaling.high_freq_factor);
        rs["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
        j["rope_scaling"] = rs;
        break;
      }
    }
    j["attention_bias"] = c.attention_bias;
    if (!c.layer_weight_map.empty()) j["layer_weight_map"] = c.layer_weight_map;
    j["tie_word_embeddings"] = c.tie_word_embeddings;
    j["torch_dtype"] = DTypeName(c.dtype);
    if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
    if (c.eos_token_ids.size() == 1) {
      j["eos_token_id"] = c.eos_token_ids[0];
    } else if (!c.eos_token_ids.empty()) {
      j["eos_token_id"] = c.eos_token_ids;
    }
    if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
    return j.dump(2) + "\n";
  } catch (const std::exception& e) {
    return "{}";
  }
}

}  // namespace superpose::engine
