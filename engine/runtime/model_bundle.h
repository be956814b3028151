// Everything needed to serve one model: config, weights, tokenizer. Loaded from a
// Hugging Face directory, or the built-in demo model when no path is given.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/config.h"
#include "engine/model/tokenizer.h"
#include "engine/model/weights.h"

namespace superpose::engine {

struct ModelBundle {
  std::string name;  // directory base name, or "builtin"
  bool builtin = false;
  ModelConfig config;
  std::unique_ptr<WeightSource> weights;
  std::unique_ptr<Tokenizer> tokenizer;
};

// `dir` empty: the built-in model. Errors name the file and the field.
absl::StatusOr<ModelBundle> LoadModelBundle(const std::string& dir);

}  // namespace superpose::engine
