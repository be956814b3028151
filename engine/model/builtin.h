// The built-in demo model (served when no --model is given) and the generator of
// random-weight Llama-shaped models for benchmarks and tests. Their text is meaningless.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace superpose::engine {

struct BuiltinModel {
  ModelConfig config;
  std::unique_ptr<InMemoryWeights> weights;
  std::string tokenizer_json;
};

// The built-in model: Llama-shaped, hidden 128, 4 layers, 4 query heads / 2 KV heads
// (head_dim 32), intermediate 352, tied embeddings, max_position_embeddings 2048,
// vocab = ByteLevelTokenizerSize(). Random weights scaled so that generation varies
// (see builtin.cc; the final norm has random signs so that the tied embedding does not
// just predict the input token again). Deterministic: the same float32 weights on
// every machine (integer hashing, one float rounding per value).
BuiltinModel MakeBuiltinModel();

// Vocabulary size limit of the built-in model's tokenizer.
inline constexpr int32_t kBuiltinVocabLimit = 384;

// A GPT-2 style byte-level BPE tokenizer.json (model BPE, pre-tokenizer
// ByteLevel(add_prefix_space=false, use_regex=true), decoder ByteLevel):
//   ids 0..255   the single bytes in byte order (id b is byte b), each spelled with
//                GPT-2's byte-to-unicode character (so id 32 is "Ġ", id 65 is "A");
//   id 256       "<s>"  (BOS; special; added by a TemplateProcessing post-processor)
//   id 257       "</s>" (EOS; special)
//   ids 258..    merged tokens, one per merge, learned deterministically by BPE from a
//                small English text built into this file, until vocab_size_limit tokens
//                or no pair occurs twice.
// The result has ByteLevelTokenizerSize(vocab_size_limit) tokens (at least 258).
std::string ByteLevelTokenizerJson(int32_t vocab_size_limit = kBuiltinVocabLimit);
int32_t ByteLevelTokenizerSize(int32_t vocab_size_limit = kBuiltinVocabLimit);

// Llama-shaped config with the given sizes (head_dim = hidden / heads, untied
// embeddings, rope_theta 10000, rms_norm_eps 1e-5, max_position_embeddings 4096,
// bfloat16, bos 256, eos 257 as in ByteLevelTokenizerJson). E.g. about 350M parameters:
// LlamaShapedConfig(1024, 24, 16, 8, 2816, 32000).
ModelConfig LlamaShapedConfig(int32_t hidden, int32_t layers, int32_t heads, int32_t kv_heads,
                              int32_t intermediate, int32_t vocab);

// Writes a random-weight model directory `dir` (created if missing): config.json (with
// torch_dtype = `dtype`), generation_config.json, model.safetensors in `dtype` and
// tokenizer.json = ByteLevelTokenizerJson(config.vocab_size). Matrices, embeddings and
// biases are ~N(0, 0.02) (a sum of 4 uniforms), norms are 1; fixed by `seed`. The
// weights are generated and converted chunk by chunk, so memory stays small.
// config.vocab_size must be at least 258.
absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& config, DType dtype,
                              uint64_t seed);

}  // namespace superpose::engine
