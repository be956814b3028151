#include "engine/model/tokenizer_components.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer_unicode.h"
#include "engine/util/status.h"

namespace superpose::engine::tok {

using json = nlohmann::json;

absl::Status ParseContext::Error(const std::string& field, const std::string& message) const {
  return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, "': ", message));
}

// ---------------------------------------------------------------- JSON helpers

absl::StatusOr<std::string> GetString(const json& j, const char* key, const std::string& field,
                                      const ParseContext& ctx) {
  std::string f = absl::StrCat(field, ".", key);
  if (!j.is_object() || !j.contains(key)) return ctx.Error(f, "missing");
  const json& v = j.at(key);
  if (!v.is_string()) return ctx.Error(f, "expected a string");
  return v.get<std::string>();
}

absl::StatusOr<bool> GetBool(const json& j, const char* key, bool default_value,
                             const std::string& field, const ParseContext& ctx) {
  if (!j.is_object() || !j.contains(key) || j.at(key).is_null()) return default_value;
  const json& v = j.at(key);
  if (!v.is_boolean()) return ctx.Error(absl::StrCat(field, ".", key), "expected a boolean");
  return v.get<bool>();
}

absl::StatusOr<std::string> GetType(const json& j, const std::string& field,
                                    const ParseContext& ctx) {
  if (!j.is_object()) return ctx.Error(field, "expected an object");
  return GetString(j, "type", field, ctx);
}

namespace {

absl::StatusOr<int64_t> GetInt(const json& j, const char* key, int64_t default_value,
                               const std::string& field, const ParseContext& ctx) {
  if (!j.is_object() || !j.contains(key) || j.at(key).is_null()) return default_value;
  const json& v = j.at(key);
  if (!v.is_number_integer())
    return ctx.Error(absl::StrCat(field, ".", key), "expected an integer");
  return v.get<int64_t>();
}

// A single character given as a JSON string.
absl::StatusOr<std::string> GetChar(const json& j, const char* key, const std::string& field,
                                    const ParseContext& ctx) {
  SP_ASSIGN_OR_RETURN(std::string s, GetString(j, key, field, ctx));
  size_t i = 0;
  char32_t cp;
  if (s.empty() || !NextCodePoint(s, &i, &cp) || i != s.size()) {
    return ctx.Error(absl::StrCat(field, ".", key), "expected a single character");
  }
  return s;
}

// {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  std::string literal;           // when regex == nullptr
  std::unique_ptr<Regex> regex;  // otherwise
};

absl::StatusOr<Pattern> ParsePattern(const json& j, const std::string& field,
                                     const ParseContext& ctx) {
  std::string f = absl::StrCat(field, ".pattern");
  if (!j.is_object() || !j.contains("pattern") || !j.at("pattern").is_object()) {
    return ctx.Error(f, "expected {\"String\": ...} or {\"Regex\": ...}");
  }
  const json& p = j.at("pattern");
  Pattern out;
  if (p.contains("String") && p.at("String").is_string()) {
    out.literal = p.at("String").get<std::string>();
  } else if (p.contains("Regex") && p.at("Regex").is_string()) {
    auto re = Regex::Compile(p.at("Regex").get<std::string>());
    if (!re.ok()) return ctx.Error(absl::StrCat(f, ".Regex"), std::string(re.status().message()));
    out.regex = std::move(re).value();
  } else {
    return ctx.Error(f, "expected {\"String\": ...} or {\"Regex\": ...}");
  }
  return out;
}

// Non-overlapping occurrences of a pattern, left to right.
void FindPattern(const Pattern& p, std::string_view s,
                 std::vector<std::pair<size_t, size_t>>* out) {
  if (p.regex) {
    p.regex->FindAll(s, out);
    return;
  }
  if (p.literal.empty()) return;  // HF: an empty string pattern matches nothing
  size_t pos = 0;
  while ((pos = s.find(p.literal, pos)) != std::string_view::npos) {
    out->emplace_back(pos, pos + p.literal.size());
    pos += p.literal.size();
  }
}

std::string ReplaceAll(const Pattern& p, const std::string& content, std::string_view s) {
  std::vector<std::pair<size_t, size_t>> m;
  FindPattern(p, s, &m);
  if (m.empty()) return std::string(s);
  std::string out;
  out.reserve(s.size() + m.size() * content.size());
  size_t prev = 0;
  for (auto [a, b] : m) {
    out.append(s.data() + prev, a - prev);
    out.append(content);
    prev = b;
  }
  out.append(s.data() + prev, s.size() - prev);
  return out;
}

}  // namespace

// ---------------------------------------------------------------- Regex

std::string OnigToPcre2(std::string_view p) {
  // Oniguruma's \w (as measured through HF): Alphabetic, marks, Nd and Pc; outside a
  // character class its Latin-1 table also counts ² ³ ¹ ¼ ½ ¾ as word characters.
  static constexpr std::string_view kWord = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
  static constexpr std::string_view kWordOutside =
      "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{B2}\\x{B3}\\x{B9}\\x{BC}-\\x{BE}";
  static constexpr std::string_view kHex = "0-9a-fA-F";
  std::string out;
  out.reserve(p.size() + 32);
  bool in_class = false;
  size_t i = 0;
  auto set = [&](std::string_view members, bool negated) {
    if (in_class) {
      out.append(members);
    } else {
      out.append(negated ? "[^" : "[");
      out.append(members);
      out.push_back(']');
    }
  };
  while (i < p.size()) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      if (e == 'Q') {  // literal text up to \E
        size_t end = p.find("\\E", i + 2);
        size_t stop = end == std::string_view::npos ? p.size() : end + 2;
        out.append(p.substr(i, stop - i));
        i = stop;
        continue;
      }
      switch (e) {
        case 's':
          out.append("\\p{White_Space}");
          break;
        case 'S':
          out.append("\\P{White_Space}");
          break;
        case 'w':
          set(in_class ? kWord : kWordOutside, false);
          break;
        case 'W':
          if (in_class) {
            out.append("\\W");
          } else {
            set(kWordOutside, true);
          }
          break;
        case 'h':
          set(kHex, false);
          break;
        case 'H':
          if (in_class) {
            out.append("\\H");
          } else {
            set(kHex, true);
          }
          break;
        default:
          out.append(p.substr(i, 2));
      }
      i += 2;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      ++i;
      if (i < p.size() && p[i] == '^') out.push_back(p[i++]);
      if (i < p.size() && p[i] == ']') out.push_back(p[i++]);  // a leading ']' is literal
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      size_t end = p.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(p.substr(i, end + 2 - i));
        i = end + 2;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
    ++i;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(const std::string& pattern) {
  return CompilePcre2(OnigToPcre2(pattern));
}

absl::StatusOr<std::unique_ptr<Regex>> Regex::CompilePcre2(const std::string& pattern) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    return absl::InvalidArgumentError(
        absl::StrCat("invalid regex at offset ", offset, ": ", reinterpret_cast<const char*>(buf)));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if unavailable
  std::unique_ptr<Regex> re(new Regex());
  re->code_ = code;
  return re;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

void Regex::FindAll(std::string_view subject, std::vector<std::pair<size_t, size_t>>* out) const {
  auto* code = static_cast<pcre2_code*>(code_);
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(code, nullptr);
  if (md == nullptr) return;
  const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
  const size_t n = subject.size();
  auto next_char = [&](size_t k) {
    ++k;
    while (k < n && (static_cast<unsigned char>(subject[k]) & 0xC0) == 0x80) ++k;
    return k;
  };
  size_t start = 0;
  size_t last_match_end = SIZE_MAX;
  uint32_t options = PCRE2_NO_UTF_CHECK;  // callers pass valid UTF-8
  while (start <= n) {
    int rc = pcre2_match(code, s, n, start, options, md, nullptr);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && !(options & PCRE2_NO_JIT)) {
      // e.g. JIT stack exhausted on a pathological input: retry with the interpreter.
      options |= PCRE2_NO_JIT;
      continue;
    }
    if (rc < 0) break;
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    size_t a = ov[0], b = ov[1];
    // Like the onig crate's find_iter (HF SysRegex): an empty match right where the
    // previous match ended is skipped.
    if (a == b && a == last_match_end) {
      if (a >= n) break;
      start = next_char(a);
      continue;
    }
    out->emplace_back(a, b);
    last_match_end = b;
    if (b > a) {
      start = b;
    } else {
      if (b >= n) break;
      start = next_char(b);
    }
  }
  pcre2_match_data_free(md);
}

// ---------------------------------------------------------------- normalizers

namespace {

class SequenceNormalizer : public Normalizer {
 public:
  std::vector<std::unique_ptr<Normalizer>> items;
  void Normalize(std::string* s) const override {
    for (const auto& n : items) n->Normalize(s);
  }
};

class PrependNormalizer : public Normalizer {
 public:
  std::string prepend;
  void Normalize(std::string* s) const override {
    if (!s->empty()) s->insert(0, prepend);
  }
};

class ReplaceNormalizer : public Normalizer {
 public:
  Pattern pattern;
  std::string content;
  void Normalize(std::string* s) const override { *s = ReplaceAll(pattern, content, *s); }
};

class UnicodeNormalizer : public Normalizer {
 public:
  NormalForm form;
  void Normalize(std::string* s) const override { *s = UnicodeNormalize(*s, form); }
};

class LowercaseNormalizer : public Normalizer {
 public:
  void Normalize(std::string* s) const override { *s = Lowercase(*s); }
};

class StripNormalizer : public Normalizer {
 public:
  bool left = true, right = true;
  void Normalize(std::string* s) const override {
    size_t begin = 0, end = s->size();
    if (left) {
      size_t i = 0;
      char32_t c;
      while (i < s->size()) {
        size_t at = i;
        NextCodePoint(*s, &i, &c);
        if (!IsWhitespace(c)) {
          begin = at;
          break;
        }
        begin = i;
      }
    }
    if (right) {
      // Walk forward remembering the end of the last non-whitespace character.
      size_t i = begin, last = begin;
      char32_t c;
      while (i < s->size()) {
        NextCodePoint(*s, &i, &c);
        if (!IsWhitespace(c)) last = i;
      }
      end = last;
    }
    *s = s->substr(begin, end - begin);
  }
};

class StripAccentsNormalizer : public Normalizer {
 public:
  void Normalize(std::string* s) const override {
    std::string out;
    out.reserve(s->size());
    size_t i = 0;
    while (i < s->size()) {
      size_t at = i;
      char32_t c;
      NextCodePoint(*s, &i, &c);
      if (!IsCombiningMark(c)) out.append(*s, at, i - at);
    }
    *s = std::move(out);
  }
};

class ByteLevelNormalizer : public Normalizer {
 public:
  void Normalize(std::string* s) const override {
    std::string out;
    out.reserve(s->size() * 2);
    for (unsigned char b : *s) out.append(ByteToUnicode(b));
    *s = std::move(out);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const json& j, const std::string& field,
                                                            const ParseContext& ctx) {
  if (j.is_null()) return std::unique_ptr<Normalizer>();
  SP_ASSIGN_OR_RETURN(std::string type, GetType(j, field, ctx));
  if (type == "Sequence") {
    auto seq = std::make_unique<SequenceNormalizer>();
    if (!j.contains("normalizers") || !j.at("normalizers").is_array()) {
      return ctx.Error(field + ".normalizers", "expected an array");
    }
    const json& items = j.at("normalizers");
    for (size_t i = 0; i < items.size(); ++i) {
      SP_ASSIGN_OR_RETURN(
          auto n, ParseNormalizer(items[i], absl::StrCat(field, ".normalizers[", i, "]"), ctx));
      if (n) seq->items.push_back(std::move(n));
    }
    return std::unique_ptr<Normalizer>(std::move(seq));
  }
  if (type == "Prepend") {
    auto n = std::make_unique<PrependNormalizer>();
    SP_ASSIGN_OR_RETURN(n->prepend, GetString(j, "prepend", field, ctx));
    return std::unique_ptr<Normalizer>(std::move(n));
  }
  if (type == "Replace") {
    auto n = std::make_unique<ReplaceNormalizer>();
    SP_ASSIGN_OR_RETURN(n->pattern, ParsePattern(j, field, ctx));
    SP_ASSIGN_OR_RETURN(n->content, GetString(j, "content", field, ctx));
    return std::unique_ptr<Normalizer>(std::move(n));
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    auto n = std::make_unique<UnicodeNormalizer>();
    n->form = type == "NFC"    ? NormalForm::kNFC
              : type == "NFD"  ? NormalForm::kNFD
              : type == "NFKC" ? NormalForm::kNFKC
                               : NormalForm::kNFKD;
    return std::unique_ptr<Normalizer>(std::move(n));
  }
  if (type == "Lowercase") return std::unique_ptr<Normalizer>(new LowercaseNormalizer());
  if (type == "Strip") {
    auto n = std::make_unique<StripNormalizer>();
    SP_ASSIGN_OR_RETURN(n->left, GetBool(j, "strip_left", true, field, ctx));
    SP_ASSIGN_OR_RETURN(n->right, GetBool(j, "strip_right", true, field, ctx));
    return std::unique_ptr<Normalizer>(std::move(n));
  }
  if (type == "StripAccents") return std::unique_ptr<Normalizer>(new StripAccentsNormalizer());
  if (type == "ByteLevel") return std::unique_ptr<Normalizer>(new ByteLevelNormalizer());
  return ctx.Error(field + ".type", absl::StrCat("unsupported normalizer type \"", type, "\""));
}

// ---------------------------------------------------------------- pre-tokenizers

namespace {

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

absl::StatusOr<Behavior> ParseBehavior(const json& j, Behavior default_value,
                                       const std::string& field, const ParseContext& ctx) {
  if (!j.contains("behavior") || j.at("behavior").is_null()) return default_value;
  if (!j.at("behavior").is_string()) return ctx.Error(field + ".behavior", "expected a string");
  std::string b = j.at("behavior").get<std::string>();
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return ctx.Error(field + ".behavior", absl::StrCat("unsupported behavior \"", b, "\""));
}

struct Seg {
  size_t begin, end;
  bool match;
};

// HF NormalizedString::split: `segs` covers the piece in order; emits the kept,
// non-empty parts.
void ApplyBehavior(const Piece& piece, std::vector<Seg>& segs, Behavior behavior,
                   std::vector<Piece>* out) {
  std::vector<Seg> acc;  // match == "remove" after this step
  acc.reserve(segs.size());
  switch (behavior) {
    case Behavior::kRemoved:
      acc = segs;
      break;
    case Behavior::kIsolated:
      for (const Seg& s : segs) acc.push_back({s.begin, s.end, false});
      break;
    case Behavior::kContiguous: {
      bool prev = false;
      for (const Seg& s : segs) {
        if (s.match == prev && !acc.empty()) {
          acc.back().end = s.end;
        } else {
          acc.push_back({s.begin, s.end, false});
        }
        prev = s.match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool prev = false;
      for (const Seg& s : segs) {
        if (s.match && !prev && !acc.empty()) {
          acc.back().end = s.end;
        } else {
          acc.push_back({s.begin, s.end, false});
        }
        prev = s.match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool prev = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !prev && !acc.empty()) {
          acc.back().begin = it->begin;
        } else {
          acc.push_back({it->begin, it->end, false});
        }
        prev = it->match;
      }
      std::reverse(acc.begin(), acc.end());
      break;
    }
  }
  for (const Seg& s : acc) {
    if (s.match || s.end <= s.begin) continue;
    out->push_back(
        Piece{piece.text.substr(s.begin, s.end - s.begin), piece.at_origin && s.begin == 0});
  }
}

// Segments from regex/literal matches (HF Pattern::find_matches for regexes).
void SegsFromRanges(size_t n, const std::vector<std::pair<size_t, size_t>>& ranges, bool invert,
                    std::vector<Seg>* segs) {
  size_t prev = 0;
  for (auto [a, b] : ranges) {
    if (prev != a) segs->push_back({prev, a, invert});
    segs->push_back({a, b, !invert});
    prev = b;
  }
  if (prev != n) segs->push_back({prev, n, invert});
}

// Segments from a character predicate: every matching character is its own match.
template <typename Pred>
void SegsFromChars(const std::string& s, Pred pred, bool invert, std::vector<Seg>* segs) {
  size_t i = 0, last = 0;
  while (i < s.size()) {
    size_t at = i;
    char32_t c;
    NextCodePoint(s, &i, &c);
    if (pred(c)) {
      if (last < at) segs->push_back({last, at, invert});
      segs->push_back({at, i, !invert});
      last = i;
    }
  }
  if (s.size() > last) segs->push_back({last, s.size(), invert});
}

class SequencePreTokenizer : public PreTokenizer {
 public:
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void PreTokenize(std::vector<Piece>* pieces) const override {
    for (const auto& p : items) p->PreTokenize(pieces);
  }
  bool IsByteLevel() const override {
    for (const auto& p : items) {
      if (p->IsByteLevel()) return true;
    }
    return false;
  }
};

// Base for "split every piece" pre-tokenizers.
class SplittingPreTokenizer : public PreTokenizer {
 public:
  void PreTokenize(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces->size() * 2);
    std::vector<Seg> segs;
    for (Piece& p : *pieces) {
      segs.clear();
      SplitOne(&p, &segs);
      ApplyBehavior(p, segs, behavior_, &out);
    }
    *pieces = std::move(out);
  }

 protected:
  // May rewrite the piece text before computing segments.
  virtual void SplitOne(Piece* p, std::vector<Seg>* segs) const = 0;

 public:
  Behavior behavior_ = Behavior::kIsolated;
};

// GPT-2's pre-tokenizer regex, as HF runs it with Oniguruma:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Oniguruma's \s is Unicode White_Space; PCRE2's also matches U+180E, so \s is
// spelled out as the White_Space set.
const Regex& Gpt2Regex() {
  static const Regex* re = [] {
    const std::string ws =
        R"(\t-\r\x20\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
    const std::string pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^)" + ws +
                                R"(\p{L}\p{N}]+|[)" + ws + R"(]+(?![^)" + ws + R"(])|[)" + ws +
                                "]+";
    return Regex::Compile(pattern).value().release();
  }();
  return *re;
}

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  bool add_prefix_space = true;
  bool use_regex = true;
  void PreTokenize(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces->size() * 4);
    std::vector<std::pair<size_t, size_t>> ranges;
    std::vector<Seg> segs;
    for (Piece& p : *pieces) {
      if (p.text.empty()) continue;
      if (add_prefix_space && p.text[0] != ' ') p.text.insert(0, " ");
      size_t first = out.size();
      if (use_regex) {
        ranges.clear();
        segs.clear();
        Gpt2Regex().FindAll(p.text, &ranges);
        SegsFromRanges(p.text.size(), ranges, false, &segs);
        ApplyBehavior(p, segs, Behavior::kIsolated, &out);
      } else if (!p.text.empty()) {
        out.push_back(std::move(p));
      }
      for (size_t k = first; k < out.size(); ++k) {
        std::string mapped;
        mapped.reserve(out[k].text.size() * 2);
        for (unsigned char b : out[k].text) mapped.append(ByteToUnicode(b));
        out[k].text = std::move(mapped);
      }
    }
    *pieces = std::move(out);
  }
  bool IsByteLevel() const override { return true; }
};

class RegexSplitPreTokenizer : public SplittingPreTokenizer {
 public:
  Pattern pattern;
  bool invert = false;

 protected:
  void SplitOne(Piece* p, std::vector<Seg>* segs) const override {
    std::vector<std::pair<size_t, size_t>> ranges;
    FindPattern(pattern, p->text, &ranges);
    SegsFromRanges(p->text.size(), ranges, invert, segs);
  }
};

class DigitsPreTokenizer : public SplittingPreTokenizer {
 protected:
  void SplitOne(Piece* p, std::vector<Seg>* segs) const override {
    SegsFromChars(p->text, IsNumeric, false, segs);
  }
};

class PunctuationPreTokenizer : public SplittingPreTokenizer {
 protected:
  void SplitOne(Piece* p, std::vector<Seg>* segs) const override {
    SegsFromChars(p->text, IsPunctuation, false, segs);
  }
};

class WhitespaceSplitPreTokenizer : public SplittingPreTokenizer {
 protected:
  void SplitOne(Piece* p, std::vector<Seg>* segs) const override {
    SegsFromChars(p->text, IsWhitespace, false, segs);
  }
};

enum class PrependScheme { kFirst, kAlways, kNever };

class MetaspacePreTokenizer : public SplittingPreTokenizer {
 public:
  std::string replacement;  // one character
  char32_t replacement_cp = 0x2581;
  PrependScheme scheme = PrependScheme::kAlways;
  bool split = true;
  void PreTokenize(std::vector<Piece>* pieces) const override {
    if (split) {
      SplittingPreTokenizer::PreTokenize(pieces);
      return;
    }
    for (Piece& p : *pieces) Rewrite(&p);
  }

 protected:
  void Rewrite(Piece* p) const {
    std::string s;
    s.reserve(p->text.size() + 8);
    for (char c : p->text) {
      if (c == ' ') {
        s.append(replacement);
      } else {
        s.push_back(c);
      }
    }
    bool starts = s.compare(0, replacement.size(), replacement) == 0;
    if (!starts &&
        (scheme == PrependScheme::kAlways || (scheme == PrependScheme::kFirst && p->at_origin))) {
      s.insert(0, replacement);
    }
    p->text = std::move(s);
  }
  void SplitOne(Piece* p, std::vector<Seg>* segs) const override {
    Rewrite(p);
    char32_t r = replacement_cp;
    SegsFromChars(
        p->text, [r](char32_t c) { return c == r; }, false, segs);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const json& j,
                                                                const std::string& field,
                                                                const ParseContext& ctx) {
  if (j.is_null()) return std::unique_ptr<PreTokenizer>();
  SP_ASSIGN_OR_RETURN(std::string type, GetType(j, field, ctx));
  if (type == "Sequence") {
    auto seq = std::make_unique<SequencePreTokenizer>();
    if (!j.contains("pretokenizers") || !j.at("pretokenizers").is_array()) {
      return ctx.Error(field + ".pretokenizers", "expected an array");
    }
    const json& items = j.at("pretokenizers");
    for (size_t i = 0; i < items.size(); ++i) {
      SP_ASSIGN_OR_RETURN(
          auto p, ParsePreTokenizer(items[i], absl::StrCat(field, ".pretokenizers[", i, "]"), ctx));
      if (p) seq->items.push_back(std::move(p));
    }
    return std::unique_ptr<PreTokenizer>(std::move(seq));
  }
  if (type == "ByteLevel") {
    auto p = std::make_unique<ByteLevelPreTokenizer>();
    SP_ASSIGN_OR_RETURN(p->add_prefix_space, GetBool(j, "add_prefix_space", true, field, ctx));
    SP_ASSIGN_OR_RETURN(p->use_regex, GetBool(j, "use_regex", true, field, ctx));
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "Split") {
    auto p = std::make_unique<RegexSplitPreTokenizer>();
    SP_ASSIGN_OR_RETURN(p->pattern, ParsePattern(j, field, ctx));
    if (!p->pattern.regex) {
      // HF compiles a String pattern as an escaped regex; a literal search is the same.
      if (p->pattern.literal.empty()) return ctx.Error(field + ".pattern", "empty pattern");
    }
    SP_ASSIGN_OR_RETURN(p->behavior_, ParseBehavior(j, Behavior::kIsolated, field, ctx));
    SP_ASSIGN_OR_RETURN(p->invert, GetBool(j, "invert", false, field, ctx));
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "Digits") {
    auto p = std::make_unique<DigitsPreTokenizer>();
    SP_ASSIGN_OR_RETURN(bool individual, GetBool(j, "individual_digits", false, field, ctx));
    p->behavior_ = individual ? Behavior::kIsolated : Behavior::kContiguous;
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "Punctuation") {
    auto p = std::make_unique<PunctuationPreTokenizer>();
    SP_ASSIGN_OR_RETURN(p->behavior_, ParseBehavior(j, Behavior::kIsolated, field, ctx));
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "WhitespaceSplit") {
    auto p = std::make_unique<WhitespaceSplitPreTokenizer>();
    p->behavior_ = Behavior::kRemoved;
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "Whitespace") {
    // HF: split on \w+|[^\w\s]+ keeping the matches (inverted pattern, Removed). That
    // regex is the Rust regex crate's: \w is Alphabetic|Mark|Nd|Pc|Join_Control.
    auto p = std::make_unique<RegexSplitPreTokenizer>();
    static constexpr char kWord[] = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control})";
    p->pattern.regex =
        Regex::CompilePcre2(absl::StrCat("[", kWord, "]+|[^", kWord, R"(\p{White_Space}]+)"))
            .value();
    p->invert = true;
    p->behavior_ = Behavior::kRemoved;
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  if (type == "Metaspace") {
    auto p = std::make_unique<MetaspacePreTokenizer>();
    SP_ASSIGN_OR_RETURN(p->replacement, GetChar(j, "replacement", field, ctx));
    size_t i = 0;
    NextCodePoint(p->replacement, &i, &p->replacement_cp);
    if (j.contains("prepend_scheme") && !j.at("prepend_scheme").is_null()) {
      SP_ASSIGN_OR_RETURN(std::string scheme, GetString(j, "prepend_scheme", field, ctx));
      if (scheme == "first") {
        p->scheme = PrependScheme::kFirst;
      } else if (scheme == "always") {
        p->scheme = PrependScheme::kAlways;
      } else if (scheme == "never") {
        p->scheme = PrependScheme::kNever;
      } else {
        return ctx.Error(field + ".prepend_scheme",
                         absl::StrCat("unsupported value \"", scheme, "\""));
      }
    } else {
      SP_ASSIGN_OR_RETURN(bool add, GetBool(j, "add_prefix_space", true, field, ctx));
      p->scheme = add ? PrependScheme::kAlways : PrependScheme::kNever;
    }
    SP_ASSIGN_OR_RETURN(p->split, GetBool(j, "split", true, field, ctx));
    p->behavior_ = Behavior::kMergedWithNext;
    return std::unique_ptr<PreTokenizer>(std::move(p));
  }
  return ctx.Error(field + ".type", absl::StrCat("unsupported pre-tokenizer type \"", type, "\""));
}

// ---------------------------------------------------------------- decoders

namespace {

class SequenceDecoder : public Decoder {
 public:
  std::vector<std::unique_ptr<Decoder>> items;
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (const auto& d : items) d->DecodeChain(tokens);
  }
  bool IsByteLevel() const override {
    for (const auto& d : items) {
      if (d->IsByteLevel()) return true;
    }
    return false;
  }
};

class ReplaceDecoder : public Decoder {
 public:
  Pattern pattern;
  std::string content;
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) t = ReplaceAll(pattern, content, t);
  }
};

// "<0xAB>" -> 0xAB, or -1.
int ParseByteToken(std::string_view t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  int lo = hex(t[4]);
  if (lo < 0) return -1;
  if (t[3] == '+') return lo;  // Rust's u8::from_str_radix accepts a leading '+'
  int hi = hex(t[3]);
  if (hi < 0) return -1;
  return hi * 16 + lo;
}

class ByteFallbackDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string bytes;
    auto flush = [&]() {
      if (bytes.empty()) return;
      if (IsValidUtf8(bytes)) {
        out.push_back(bytes);
      } else {
        // HF: one U+FFFD per byte token when the group is not valid UTF-8.
        for (size_t k = 0; k < bytes.size(); ++k) out.emplace_back(kReplacementChar);
      }
      bytes.clear();
    };
    for (std::string& t : *tokens) {
      int b = ParseByteToken(t);
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    *tokens = std::move(out);
  }
};

class FuseDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const std::string& t : *tokens) all.append(t);
    tokens->assign(1, std::move(all));
  }
};

class StripDecoder : public Decoder {
 public:
  char32_t content = ' ';
  size_t start = 0, stop = 0;
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) {
      // Code point boundaries of t.
      std::vector<std::pair<size_t, char32_t>> chars;
      size_t i = 0;
      while (i < t.size()) {
        size_t at = i;
        char32_t c;
        NextCodePoint(t, &i, &c);
        chars.emplace_back(at, c);
      }
      size_t start_cut = 0;
      for (size_t k = 0; k < start && k < chars.size(); ++k) {
        if (chars[k].second != content) break;
        start_cut = k + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t k = 0; k < stop && k < chars.size(); ++k) {
        size_t index = chars.size() - k - 1;
        if (chars[index].second != content) break;
        stop_cut = index;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      size_t b = start_cut < chars.size() ? chars[start_cut].first : t.size();
      size_t e = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
      t = t.substr(b, e - b);
    }
  }
};

class ByteLevelDecoder : public Decoder {
 public:
  void DecodeChain(std::vector<std::string>* tokens) const override {
    std::string bytes;
    std::string mapped;
    for (const std::string& t : *tokens) {
      mapped.clear();
      bool all_mapped = true;
      size_t i = 0;
      while (i < t.size()) {
        char32_t c;
        NextCodePoint(t, &i, &c);
        int b = UnicodeToByte(c);
        if (b < 0) {
          all_mapped = false;
          break;
        }
        mapped.push_back(static_cast<char>(b));
      }
      bytes.append(all_mapped ? mapped : t);
    }
    tokens->assign(1, Utf8Lossy(bytes));
  }
  bool IsByteLevel() const override { return true; }
};

class MetaspaceDecoder : public Decoder {
 public:
  std::string replacement;
  bool prepend = true;  // prepend_scheme != never
  void DecodeChain(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      std::string& t = (*tokens)[i];
      std::string out;
      out.reserve(t.size());
      size_t pos = 0;
      while (pos < t.size()) {
        if (t.compare(pos, replacement.size(), replacement) == 0) {
          if (!(i == 0 && prepend)) out.push_back(' ');
          pos += replacement.size();
        } else {
          out.push_back(t[pos++]);
        }
      }
      t = std::move(out);
    }
  }
};

class BpeSuffixDecoder : public Decoder {
 public:
  std::string suffix;
  void DecodeChain(std::vector<std::string>* tokens) const override {
    Pattern p;
    p.literal = suffix;
    for (size_t i = 0; i < tokens->size(); ++i) {
      (*tokens)[i] = ReplaceAll(p, i + 1 == tokens->size() ? "" : " ", (*tokens)[i]);
    }
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const json& j, const std::string& field,
                                                      const ParseContext& ctx) {
  if (j.is_null()) return std::unique_ptr<Decoder>();
  SP_ASSIGN_OR_RETURN(std::string type, GetType(j, field, ctx));
  if (type == "Sequence") {
    auto seq = std::make_unique<SequenceDecoder>();
    if (!j.contains("decoders") || !j.at("decoders").is_array()) {
      return ctx.Error(field + ".decoders", "expected an array");
    }
    const json& items = j.at("decoders");
    for (size_t i = 0; i < items.size(); ++i) {
      SP_ASSIGN_OR_RETURN(auto d,
                          ParseDecoder(items[i], absl::StrCat(field, ".decoders[", i, "]"), ctx));
      if (d) seq->items.push_back(std::move(d));
    }
    return std::unique_ptr<Decoder>(std::move(seq));
  }
  if (type == "Replace") {
    auto d = std::make_unique<ReplaceDecoder>();
    SP_ASSIGN_OR_RETURN(d->pattern, ParsePattern(j, field, ctx));
    SP_ASSIGN_OR_RETURN(d->content, GetString(j, "content", field, ctx));
    return std::unique_ptr<Decoder>(std::move(d));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    auto d = std::make_unique<StripDecoder>();
    SP_ASSIGN_OR_RETURN(std::string content, GetChar(j, "content", field, ctx));
    size_t i = 0;
    NextCodePoint(content, &i, &d->content);
    SP_ASSIGN_OR_RETURN(int64_t start, GetInt(j, "start", 0, field, ctx));
    SP_ASSIGN_OR_RETURN(int64_t stop, GetInt(j, "stop", 0, field, ctx));
    if (start < 0 || stop < 0) return ctx.Error(field, "start/stop must be >= 0");
    d->start = static_cast<size_t>(start);
    d->stop = static_cast<size_t>(stop);
    return std::unique_ptr<Decoder>(std::move(d));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "Metaspace") {
    auto d = std::make_unique<MetaspaceDecoder>();
    SP_ASSIGN_OR_RETURN(d->replacement, GetChar(j, "replacement", field, ctx));
    if (j.contains("prepend_scheme") && !j.at("prepend_scheme").is_null()) {
      SP_ASSIGN_OR_RETURN(std::string scheme, GetString(j, "prepend_scheme", field, ctx));
      if (scheme != "first" && scheme != "always" && scheme != "never") {
        return ctx.Error(field + ".prepend_scheme",
                         absl::StrCat("unsupported value \"", scheme, "\""));
      }
      d->prepend = scheme != "never";
    } else {
      SP_ASSIGN_OR_RETURN(d->prepend, GetBool(j, "add_prefix_space", true, field, ctx));
    }
    return std::unique_ptr<Decoder>(std::move(d));
  }
  if (type == "BPEDecoder") {
    auto d = std::make_unique<BpeSuffixDecoder>();
    if (j.contains("suffix") && j.at("suffix").is_string()) {
      d->suffix = j.at("suffix").get<std::string>();
    } else {
      d->suffix = "</w>";
    }
    return std::unique_ptr<Decoder>(std::move(d));
  }
  return ctx.Error(field + ".type", absl::StrCat("unsupported decoder type \"", type, "\""));
}

}  // namespace superpose::engine::tok
