// The pipeline pieces of a Hugging Face tokenizer.json, parsed from JSON: normalizers,
// pre-tokenizers and decoders, each reproducing HF `tokenizers` (Rust) semantics on
// plain UTF-8 strings (offsets are not tracked: the server only needs ids and text).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace superpose::engine::tok {

// Builds errors that name the source file and the JSON field.
struct ParseContext {
  std::string source;
  absl::Status Error(const std::string& field, const std::string& message) const;
};

// Rewrites the escapes whose meaning differs between Oniguruma (what HF's SysRegex uses
// for Split / Replace / ByteLevel patterns) and PCRE2 in UCP mode: \s \S become
// White_Space (PCRE2's \s also matches U+180E), \w \W become Alphabetic|Mark|Nd|Pc
// (PCRE2 10.42's \w is L|N|_), \h \H become hex digits
// (PCRE2: horizontal space). \Q...\E is kept verbatim. Inside a character class \W and
// \H cannot be expressed and are left as PCRE2 reads them.
std::string OnigToPcre2(std::string_view pattern);

// A compiled PCRE2 regex (UTF + Unicode properties, JIT when available). Thread-safe:
// matching allocates its own match data.
class Regex {
 public:
  // `pattern` in Oniguruma syntax (rewritten with OnigToPcre2).
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern);
  // `pattern` in PCRE2 syntax, used as is.
  static absl::StatusOr<std::unique_ptr<Regex>> CompilePcre2(const std::string& pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  // Appends the non-overlapping matches [start, end) of `subject` (valid UTF-8), left to
  // right; an empty match advances by one character.
  void FindAll(std::string_view subject, std::vector<std::pair<size_t, size_t>>* out) const;

 private:
  Regex() = default;
  void* code_ = nullptr;  // pcre2_code*
};

// ---- normalizers ----
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string* s) const = 0;
};
// `j` may be null (no normalizer): returns nullptr then.
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const nlohmann::json& j,
                                                            const std::string& field,
                                                            const ParseContext& ctx);

// ---- pre-tokenizers ----
struct Piece {
  std::string text;
  bool at_origin = false;  // starts at offset 0 of the original input (Metaspace "first")
};
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits (and may rewrite) every piece.
  virtual void PreTokenize(std::vector<Piece>* pieces) const = 0;
  virtual bool IsByteLevel() const { return false; }
};
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const nlohmann::json& j,
                                                                const std::string& field,
                                                                const ParseContext& ctx);

// ---- decoders ----
class Decoder {
 public:
  virtual ~Decoder() = default;
  // HF decode_chain: rewrites the list of token strings.
  virtual void DecodeChain(std::vector<std::string>* tokens) const = 0;
  virtual bool IsByteLevel() const { return false; }
};
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const nlohmann::json& j,
                                                      const std::string& field,
                                                      const ParseContext& ctx);

// Reads `j[key]` as a string ({"String": s} / {"Regex": r} patterns are handled by the
// callers). Helpers shared with tokenizer.cc.
absl::StatusOr<std::string> GetString(const nlohmann::json& j, const char* key,
                                      const std::string& field, const ParseContext& ctx);
absl::StatusOr<bool> GetBool(const nlohmann::json& j, const char* key, bool default_value,
                             const std::string& field, const ParseContext& ctx);
absl::StatusOr<std::string> GetType(const nlohmann::json& j, const std::string& field,
                                    const ParseContext& ctx);

}  // namespace superpose::engine::tok
