// genmodel: writes a random-weight Llama-shaped model directory for benchmarks.
//   build/bench/genmodel --out=/tmp/llama-110m --shape=llama-110m [--dtype=bf16]
#include <cstdio>
#include <filesystem>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/model/builtin.h"

ABSL_FLAG(std::string, out, "", "Output directory");
ABSL_FLAG(std::string, shape, "llama-110m", "llama-110m | llama-350m | llama-8b");
ABSL_FLAG(std::string, dtype, "bf16", "bf16 | f16 | f32");
ABSL_FLAG(uint64_t, seed, 42, "Weight seed");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  using namespace superpose::engine;  // NOLINT
  const std::string shape = absl::GetFlag(FLAGS_shape);
  ModelConfig c;
  if (shape == "llama-110m") {
    c = LlamaShapedConfig(768, 12, 12, 4, 2048, 32000);
  } else if (shape == "llama-350m") {
    c = LlamaShapedConfig(1024, 24, 16, 8, 2816, 32000);
  } else if (shape == "llama-8b") {
    c = LlamaShapedConfig(4096, 32, 32, 8, 14336, 128256);
  } else {
    std::fprintf(stderr, "--shape: unknown %s\n", shape.c_str());
    return 2;
  }
  const std::string d = absl::GetFlag(FLAGS_dtype);
  const DType dtype = d == "f32" ? DType::kF32 : d == "f16" ? DType::kF16 : DType::kBF16;
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::fprintf(stderr, "--out is required\n");
    return 2;
  }
  std::filesystem::create_directories(out);
  if (auto st = WriteRandomModel(out, c, dtype, absl::GetFlag(FLAGS_seed)); !st.ok()) {
    std::fprintf(stderr, "%s\n", st.ToString().c_str());
    return 1;
  }
  std::printf("%s: %s, %.1fM parameters\n", out.c_str(), shape.c_str(), c.NumParameters() / 1e6);
  return 0;
}
