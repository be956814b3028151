#include "engine/lora_adapter.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/model/weights.h"
#include "engine/util/status.h"

namespace superpose::engine {
namespace {

using json = nlohmann::json;

constexpr const char* kModuleNames[kNumLoraModules] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"};
constexpr const char* kPrefix = "base_model.model.model.layers.";

const char* BlockOf(int32_t module) { return module <= kLoraO ? "self_attn" : "mlp"; }

int32_t ModuleIndex(const std::string& name) {
  for (int32_t m = 0; m < kNumLoraModules; ++m) {
    if (name == kModuleNames[m]) return m;
  }
  return -1;
}

std::string TensorName(int32_t layer, int32_t module, char ab) {
  return absl::StrCat(kPrefix, layer, ".", BlockOf(module), ".", kModuleNames[module], ".lora_",
                      std::string(1, ab), ".weight");
}

// What adapter_config.json says.
struct PeftConfig {
  int32_t rank = 0;
  float alpha = 0.0f;
  bool rslora = false;
  std::string base_model;
  std::set<int32_t> modules;
  std::set<int32_t> layers;  // layers_to_transform; empty: every layer
};

absl::Status ConfigError(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::Status ParseTargets(const json& j, const std::string& path, PeftConfig* c) {
  const json* t = j.contains("target_modules") ? &j["target_modules"] : nullptr;
  if (t == nullptr) return ConfigError(path, "missing field 'target_modules'");
  std::vector<std::string> names;
  if (t->is_string()) {
    names.push_back(t->get<std::string>());
  } else if (t->is_array()) {
    for (const json& e : *t) {
      if (!e.is_string()) return ConfigError(path, "target_modules must hold strings");
      names.push_back(e.get<std::string>());
    }
  } else {
    return ConfigError(path, "target_modules must be a list of module names");
  }
  for (const std::string& n : names) {
    const int32_t m = ModuleIndex(n);
    if (m < 0) {
      return ConfigError(path, absl::StrCat("target_modules: unknown module '", n,
                                            "' (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                                            "up_proj, down_proj)"));
    }
    c->modules.insert(m);
  }
  if (c->modules.empty()) return ConfigError(path, "target_modules is empty");
  return absl::OkStatus();
}

absl::Status ParseRankAlpha(const json& j, const std::string& path, PeftConfig* c) {
  if (!j.contains("r") || !j["r"].is_number_integer()) {
    return ConfigError(path, "missing or non-integer field 'r'");
  }
  const int64_t r = j["r"].get<int64_t>();
  if (r < 1 || r > kMaxLoraRank) {
    return ConfigError(path, absl::StrCat("r must be in [1, ", kMaxLoraRank, "], got ", r));
  }
  c->rank = static_cast<int32_t>(r);
  c->alpha = static_cast<float>(r);  // PEFT's default is 8; absent here means scale 1
  if (j.contains("lora_alpha")) {
    if (!j["lora_alpha"].is_number()) return ConfigError(path, "lora_alpha must be a number");
    c->alpha = j["lora_alpha"].get<float>();
  }
  if (!std::isfinite(c->alpha)) return ConfigError(path, "lora_alpha must be finite");
  if (j.contains("use_rslora") && j["use_rslora"].is_boolean()) {
    c->rslora = j["use_rslora"].get<bool>();
  }
  return absl::OkStatus();
}

absl::Status ParseUnsupported(const json& j, const std::string& path, PeftConfig* c) {
  if (j.contains("fan_in_fan_out") && j["fan_in_fan_out"].is_boolean() &&
      j["fan_in_fan_out"].get<bool>()) {
    return ConfigError(path,
                       "fan_in_fan_out = true is not supported (Llama weights are [out, in])");
  }
  if (j.contains("bias") && j["bias"].is_string() && j["bias"].get<std::string>() != "none") {
    return ConfigError(path, "bias other than \"none\" is not supported");
  }
  if (j.contains("use_dora") && j["use_dora"].is_boolean() && j["use_dora"].get<bool>()) {
    return ConfigError(path, "use_dora = true is not supported");
  }
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null()) {
    const json& l = j["layers_to_transform"];
    if (l.is_number_integer()) {
      c->layers.insert(l.get<int32_t>());
    } else if (l.is_array()) {
      for (const json& e : l) {
        if (!e.is_number_integer()) return ConfigError(path, "layers_to_transform: integers");
        c->layers.insert(e.get<int32_t>());
      }
    } else {
      return ConfigError(path, "layers_to_transform must be an integer or a list");
    }
  }
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
    c->base_model = j["base_model_name_or_path"].get<std::string>();
  }
  return absl::OkStatus();
}

absl::StatusOr<PeftConfig> ReadPeftConfig(const std::string& dir) {
  const std::string path = dir + "/adapter_config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  const json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return ConfigError(path, "not a JSON object");
  if (j.contains("peft_type") && j["peft_type"].is_string() &&
      j["peft_type"].get<std::string>() != "LORA") {
    return ConfigError(path, "peft_type must be LORA");
  }
  PeftConfig c;
  SP_RETURN_IF_ERROR(ParseRankAlpha(j, path, &c));
  SP_RETURN_IF_ERROR(ParseTargets(j, path, &c));
  SP_RETURN_IF_ERROR(ParseUnsupported(j, path, &c));
  return c;
}

// Parses "base_model.model.model.layers.N.<block>.<module>.lora_<A|B>.weight".
absl::Status ParseTensorName(const std::string& name, int32_t* layer, int32_t* module, char* ab) {
  auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': not a LoRA tensor of a Llama projection (expected ",
                     kPrefix, "N.self_attn.q_proj.lora_A.weight and the like)"));
  };
  if (name.rfind(kPrefix, 0) != 0) return bad();
  const std::vector<std::string> parts = absl::StrSplit(name.substr(strlen(kPrefix)), '.');
  if (parts.size() != 5 || parts[4] != "weight") return bad();
  if (!absl::SimpleAtoi(parts[0], layer)) return bad();
  *module = ModuleIndex(parts[2]);
  if (*module < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", name, "': unknown module '", parts[2], "'"));
  }
  if (parts[1] != BlockOf(*module)) return bad();
  if (parts[3] != "lora_A" && parts[3] != "lora_B") return bad();
  *ab = parts[3].back();
  return absl::OkStatus();
}

// Every tensor of the file must be one the adapter's config and the model allow.
absl::Status CheckNames(const WeightSource& w, const PeftConfig& c, const ModelConfig& config,
                        const std::string& file) {
  for (const std::string& name : w.Names()) {
    int32_t layer = 0, module = 0;
    char ab = 0;
    absl::Status st = ParseTensorName(name, &layer, &module, &ab);
    if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", st.message()));
    if (layer < 0 || layer >= config.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", name, "': layer ", layer,
                                                     " past the model's ", config.num_layers));
    }
    if (!c.modules.count(module)) {
      return absl::InvalidArgumentError(absl::StrCat(
          file, ": tensor '", name, "': module ", kModuleNames[module], " not in target_modules"));
    }
  }
  return absl::OkStatus();
}

absl::Status ReadPair(const WeightSource& w, const PeftConfig& c, const ModelConfig& config,
                      int32_t layer, int32_t module, LoraMatrices* m) {
  const LoraDims d = LoraModuleDims(config, module);
  const std::string a = TensorName(layer, module, 'A'), b = TensorName(layer, module, 'B');
  const bool has_a = w.Has(a), has_b = w.Has(b);
  const bool wanted = c.layers.empty() || c.layers.count(layer);
  if (!has_a && !has_b && !wanted) return absl::OkStatus();
  if (!has_a || !has_b) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", has_a ? b : a, "' missing"));
  }
  m->a.resize(static_cast<size_t>(c.rank) * d.in);
  m->b.resize(static_cast<size_t>(d.out) * c.rank);
  SP_RETURN_IF_ERROR(w.ReadF32(a, {c.rank, d.in}, m->a.data()));
  SP_RETURN_IF_ERROR(w.ReadF32(b, {d.out, c.rank}, m->b.data()));
  for (float v : m->a) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError(absl::StrCat(a, ": not finite"));
  }
  for (float v : m->b) {
    if (!std::isfinite(v)) return absl::InvalidArgumentError(absl::StrCat(b, ": not finite"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* LoraModuleName(int32_t module) {
  return module >= 0 && module < kNumLoraModules ? kModuleNames[module] : "unknown";
}

LoraDims LoraModuleDims(const ModelConfig& config, int32_t module) {
  const int64_t H = config.hidden_size, I = config.intermediate_size;
  const int64_t nq = int64_t{config.num_heads} * config.head_dim;
  const int64_t nkv = int64_t{config.num_kv_heads} * config.head_dim;
  switch (module) {
    case kLoraQ:
      return {H, nq};
    case kLoraK:
    case kLoraV:
      return {H, nkv};
    case kLoraO:
      return {nq, H};
    case kLoraGate:
    case kLoraUp:
      return {H, I};
    case kLoraDown:
      return {I, H};
    default:
      return {};
  }
}

int64_t LoraAdapter::bytes() const {
  int64_t n = 0;
  for (const auto& layer : layers) {
    for (const LoraMatrices& m : layer) n += (m.a.size() + m.b.size()) * sizeof(float);
  }
  return n;
}

std::vector<std::string> LoraAdapter::modules() const {
  std::vector<std::string> out;
  for (int32_t m = 0; m < kNumLoraModules; ++m) {
    for (const auto& layer : layers) {
      if (!layer[m].empty()) {
        out.push_back(kModuleNames[m]);
        break;
      }
    }
  }
  return out;
}

absl::StatusOr<LoraAdapter> LoadPeftAdapter(const std::string& dir, const ModelConfig& config) {
  SP_ASSIGN_OR_RETURN(PeftConfig c, ReadPeftConfig(dir));
  const std::string file = dir + "/adapter_model.safetensors";
  SP_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> w, OpenSafetensorsFile(file));
  SP_RETURN_IF_ERROR(CheckNames(*w, c, config, file));
  LoraAdapter a;
  a.rank = c.rank;
  a.alpha = c.alpha;
  a.scale = c.rslora ? c.alpha / std::sqrt(static_cast<float>(c.rank)) : c.alpha / c.rank;
  a.base_model = c.base_model;
  a.layers.resize(config.num_layers);
  for (int32_t l = 0; l < config.num_layers; ++l) {
    for (int32_t m : c.modules) {
      absl::Status st = ReadPair(*w, c, config, l, m, &a.layers[l][m]);
      if (!st.ok()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", st.message()));
    }
  }
  return a;
}

absl::Status WritePeftAdapter(const std::string& dir, const LoraAdapter& adapter, DType dtype) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));
  json cfg = {{"peft_type", "LORA"},
              {"r", adapter.rank},
              {"lora_alpha", adapter.alpha},
              {"target_modules", adapter.modules()},
              {"base_model_name_or_path", adapter.base_model},
              {"bias", "none"},
              {"fan_in_fan_out", false}};
  std::ofstream out(dir + "/adapter_config.json");
  out << cfg.dump(2) << "\n";
  if (!out) return absl::InternalError(absl::StrCat(dir, "/adapter_config.json: write failed"));
  std::vector<NamedTensor> tensors;
  for (int32_t l = 0; l < static_cast<int32_t>(adapter.layers.size()); ++l) {
    for (int32_t m = 0; m < kNumLoraModules; ++m) {
      const LoraMatrices& p = adapter.layers[l][m];
      if (p.empty()) continue;
      const int64_t r = adapter.rank;
      tensors.push_back(
          {TensorName(l, m, 'A'), {r, static_cast<int64_t>(p.a.size()) / r}, p.a.data()});
      tensors.push_back(
          {TensorName(l, m, 'B'), {static_cast<int64_t>(p.b.size()) / r, r}, p.b.data()});
    }
  }
  return WriteSafetensors(dir + "/adapter_model.safetensors", tensors, dtype);
}

LoraAdapter RandomLoraAdapter(const ModelConfig& config, int32_t rank, float alpha,
                              const std::vector<int32_t>& modules, uint64_t seed, float amp,
                              bool b_zero) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-amp, amp);
  LoraAdapter a;
  a.rank = rank;
  a.alpha = alpha;
  a.scale = alpha / rank;
  a.layers.resize(config.num_layers);
  for (auto& layer : a.layers) {
    for (int32_t m : modules) {
      const LoraDims d = LoraModuleDims(config, m);
      layer[m].a.resize(static_cast<size_t>(rank) * d.in);
      layer[m].b.resize(static_cast<size_t>(d.out) * rank);
      for (float& v : layer[m].a) v = u(rng);
      for (float& v : layer[m].b) v = b_zero ? 0.0f : u(rng);
    }
  }
  return a;
}

}  // namespace superpose::engine
