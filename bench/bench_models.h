// Generated Llama-shaped benchmark models (random bf16 weights, written once and kept
// under a work directory).
#pragma once

#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/status/statusor.h"
#include "bench/bench_util.h"
#include "engine/model/builtin.h"
#include "engine/runtime/model_bundle.h"

namespace superpose::bench {

// `name`: llama-110m | llama-350m. `max_positions` > 0 overrides the context length
// (the directory name then says so).
inline absl::StatusOr<engine::ModelBundle> GeneratedModel(const std::string& name,
                                                          const std::string& workdir,
                                                          int32_t max_positions = 0) {
  engine::ModelConfig cfg;
  if (name == "llama-110m") {
    cfg = engine::LlamaShapedConfig(768, 12, 12, 4, 2048, 32000);
  } else if (name == "llama-350m") {
    cfg = engine::LlamaShapedConfig(1024, 24, 16, 8, 2816, 32000);
  } else {
    return absl::InvalidArgumentError("unknown model " + name);
  }
  std::string dir = workdir + "/" + name;
  if (max_positions > 0) {
    cfg.max_position_embeddings = max_positions;
    dir += "-ctx" + std::to_string(max_positions);
  }
  if (!std::filesystem::exists(dir + "/model.safetensors")) {
    std::filesystem::create_directories(dir);
    const double t0 = NowS();
    if (absl::Status st = engine::WriteRandomModel(dir, cfg, engine::DType::kBF16, 42); !st.ok()) {
      return st;
    }
    std::fprintf(stderr, "wrote %s in %.1fs\n", dir.c_str(), NowS() - t0);
  }
  return engine::LoadModelBundle(dir);
}

}  // namespace superpose::bench
