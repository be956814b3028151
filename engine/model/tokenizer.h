// Hugging Face tokenizer.json: BPE in both families used by real models
// (SentencePiece-style with byte fallback, and GPT-2 byte-level with its
// pre-tokenizer regex), added and special tokens, and incremental decoding.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace superpose::engine {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Parses tokenizer.json text. `tokenizer_config_json` (may be empty) is
  // tokenizer_config.json (add_bos_token / add_eos_token / bos / eos tokens), which
  // can override the post-processor. `source` names the file in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json, std::string_view tokenizer_config_json,
      const std::string& source);
  // Reads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::string& dir);

  // Encodes like HF `encode(text, add_special_tokens)`. Added tokens in the text are
  // matched first (special ones too).
  virtual std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const = 0;
  // Decodes like HF `decode(ids, skip_special_tokens)`. Invalid UTF-8 (e.g. an
  // incomplete byte-fallback sequence) becomes U+FFFD as in HF.
  virtual std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const = 0;

  virtual int32_t vocab_size() const = 0;  // max id + 1 (model vocab + added tokens)
  virtual bool IsSpecial(int32_t id) const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  virtual std::string IdToToken(int32_t id) const = 0;  // "" if unknown
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual std::optional<int32_t> eos_id() const = 0;
  // "sentencepiece-bpe" or "byte-level-bpe": for GetModelInfo.
  virtual std::string kind() const = 0;
};

// Incremental detokenization for streaming: feed ids one at a time, get the text that
// became final. Never returns half a UTF-8 character; the concatenation of all
// returned pieces plus Flush() equals Decode(all ids) minus Decode(prompt ids).
class DecodeStream {
 public:
  DecodeStream(const Tokenizer* tokenizer, absl::Span<const int32_t> prompt_ids,
               bool skip_special_tokens);
  std::string Step(int32_t id);
  // Remaining text at the end (e.g. a trailing incomplete character as U+FFFD).
  std::string Flush();

 private:
  // Decodes the window; emits the new text unless it ends in an incomplete character
  // (U+FFFD), which `flush` emits anyway.
  std::string Advance(bool flush);

  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;
  size_t read_offset_ = 0;
};

}  // namespace superpose::engine
