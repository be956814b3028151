// superpose-quantize: writes a weight-only quantized copy of a Hugging Face model
// directory (engine/model/quant_checkpoint.h) that superpose-server loads like any model
// (--model=DIR). docs/operations.md, "Quantized weights".
//
//   superpose-quantize --model=DIR --out=DIR --weights=int8|q4
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/clock.h"
#include "engine/model/quant_checkpoint.h"

ABSL_FLAG(std::string, model, "", "input model directory (config.json + *.safetensors)");
ABSL_FLAG(std::string, out, "", "output model directory (created when missing)");
ABSL_FLAG(std::string, weights, "int8",
          "int8 (symmetric, one float32 scale per output channel) | q4 (4-bit palettized: "
          "a 16-entry float16 table per group of 16 input columns, k-means fit)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "superpose-quantize --model=DIR --out=DIR --weights=int8|q4: quantizes the q/k/v/o, "
      "gate/up/down projections (and an untied lm_head) of a float checkpoint");
  absl::ParseCommandLine(argc, argv);
  using superpose::engine::WeightQuant;
  const std::string model = absl::GetFlag(FLAGS_model), out = absl::GetFlag(FLAGS_out);
  const std::string w = absl::GetFlag(FLAGS_weights);
  if (model.empty() || out.empty()) {
    std::fprintf(stderr, "--model and --out are required\n");
    return 2;
  }
  WeightQuant kind = WeightQuant::kNone;
  if (w == "int8") {
    kind = WeightQuant::kInt8;
  } else if (w == "q4") {
    kind = WeightQuant::kQ4;
  } else {
    std::fprintf(stderr, "--weights must be int8 or q4, got \"%s\"\n", w.c_str());
    return 2;
  }
  const absl::Time start = absl::Now();
  auto summary = superpose::engine::QuantizeCheckpoint(model, out, kind);
  if (!summary.ok()) {
    std::fprintf(stderr, "superpose-quantize: %s\n", summary.status().ToString().c_str());
    return 1;
  }
  std::printf("%s: %lld projections quantized (%s), %lld tensors copied, %.1f MiB in %.1f s\n",
              out.c_str(), static_cast<long long>(summary->quantized_tensors), w.c_str(),
              static_cast<long long>(summary->copied_tensors), summary->bytes_written / 1048576.0,
              absl::ToDoubleSeconds(absl::Now() - start));
  return 0;
}
