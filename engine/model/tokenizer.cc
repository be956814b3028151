// Hugging Face tokenizer.json: the encode pipeline (added tokens -> normalizer -> added
// tokens on normalized text -> pre-tokenizer -> BPE -> post-processor), decoding, and
// incremental (streaming) decoding. Semantics follow HF `tokenizers` (Rust); see
// tokenizer_components.cc for the normalizers, pre-tokenizers and decoders, and
// tokenizer_bpe.cc for the model.
//
// Choices where HF is not the whole story (documented for GetModelInfo users):
// - tokenizer_config.json: `add_bos_token` / `add_eos_token`, when present, override
//   whether the post-processor adds BOS before / EOS after the sequence (what
//   transformers' LlamaTokenizerFast does); a key that is absent keeps the
//   tokenizer.json post-processor's behaviour for that side.
// - bos_id(): tokenizer_config `bos_token` if it names a known token, else the special
//   token the post-processor puts before the sequence, else none.
//   eos_id(): tokenizer_config `eos_token` if known, else the special token the
//   post-processor puts after the sequence, else the first known of `</s>`,
//   `<|endoftext|>`, `<|im_end|>`, `<|end_of_text|>`, `<eos>`.
// - truncation / padding / BPE dropout in tokenizer.json are ignored (the server
//   controls lengths; encoding is deterministic).
// - Input text that is not valid UTF-8 is first converted like
//   String::from_utf8_lossy (each invalid subpart becomes U+FFFD).
// - The reference is HF `tokenizers` 0.23 (the version the fixtures were made with),
//   checked differentially on random text (tests/tokenizer_test.cc,
//   TokenizerDifferential). Version-specific: an added token with normalized=true whose
//   content the normalizer changes is decoded (and returned by IdToToken) in its
//   normalized form, and skip_special_tokens compares that form with the special
//   contents, as 0.23 does.
// - Regexes in tokenizer.json are Oniguruma patterns (HF SysRegex); they run on PCRE2
//   after tok::OnigToPcre2 rewrites the escapes whose meaning differs, and matches are
//   iterated like the onig crate (an empty match right after a match is skipped).
// - HF ignores the ids in added_tokens when they disagree with the vocab (a content in
//   the vocab takes its vocab id); real files are consistent, so the ids are used as
//   written.
#include "engine/model/tokenizer.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "engine/model/tokenizer_bpe.h"
#include "engine/model/tokenizer_components.h"
#include "engine/model/tokenizer_unicode.h"
#include "engine/util/status.h"

namespace superpose::engine {

namespace {

using json = nlohmann::json;
using tok::ParseContext;

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
  // What Decode / IdToToken use: HF (0.23) keeps the normalizer's output for a
  // `normalized` token whose content the normalizer changes, so that the decoder can
  // invert it (e.g. " x" under Prepend("▁")+Replace(" ", "▁") decodes from "▁▁x").
  std::string decode_form;
};

// Leftmost-longest matching of a set of literal patterns (HF uses Aho-Corasick with
// MatchKind::LeftmostLongest; the sets are small, so a first-byte index suffices).
class LiteralMatcher {
 public:
  void Add(std::string pattern, int token_index) {
    if (pattern.empty()) return;
    by_first_[static_cast<unsigned char>(pattern[0])].push_back(patterns_.size());
    patterns_.emplace_back(std::move(pattern), token_index);
  }
  bool empty() const { return patterns_.empty(); }
  // The token index of the longest pattern starting at `pos` (setting *len), or -1.
  int LongestAt(std::string_view s, size_t pos, size_t* len) const {
    int best = -1;
    size_t best_len = 0;
    for (size_t k : by_first_[static_cast<unsigned char>(s[pos])]) {
      const std::string& p = patterns_[k].first;
      if (p.size() > best_len && s.size() - pos >= p.size() && s.compare(pos, p.size(), p) == 0) {
        best = patterns_[k].second;
        best_len = p.size();
      }
    }
    *len = best_len;
    return best;
  }

 private:
  std::vector<std::pair<std::string, int>> patterns_;
  std::array<std::vector<size_t>, 256> by_first_;
};

struct Segment {
  std::string_view text;
  int32_t id = -1;  // >= 0: an added token
  bool at_origin = false;
};

bool EndsWithWordChar(std::string_view s) {
  if (s.empty()) return false;
  size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  char32_t c;
  tok::NextCodePoint(s, &i, &c);
  return tok::IsWordChar(c);
}

bool StartsWithWordChar(std::string_view s) {
  if (s.empty()) return false;
  size_t i = 0;
  char32_t c;
  tok::NextCodePoint(s, &i, &c);
  return tok::IsWordChar(c);
}

// Start of the trailing whitespace run of s.
size_t TrailingSpaceStart(std::string_view s) {
  size_t i = 0, start = 0;
  while (i < s.size()) {
    char32_t c;
    tok::NextCodePoint(s, &i, &c);
    if (!tok::IsWhitespace(c)) start = i;
  }
  return start;
}

// Length of the leading whitespace run of s.
size_t LeadingSpaceLen(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t at = i;
    char32_t c;
    tok::NextCodePoint(s, &i, &c);
    if (!tok::IsWhitespace(c)) return at;
  }
  return s.size();
}

bool StartsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.compare(0, p.size(), p) == 0;
}
bool EndsWith(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

class HfTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Parse(const json& j, const json* config,
                                                            const ParseContext& ctx,
                                                            const ParseContext& config_ctx);

  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const override;
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  bool IsSpecial(int32_t id) const override {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && added_[it->second].special;
  }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto it = added_by_content_.find(absl::string_view(token.data(), token.size()));
    if (it != added_by_content_.end()) return added_[it->second].id;
    return model_->TokenToId(token);
  }
  std::string IdToToken(int32_t id) const override {
    const std::string* t = TokenString(id);
    return t ? *t : std::string();
  }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  std::optional<int32_t> eos_id() const override { return eos_id_; }
  std::string kind() const override { return kind_; }

 private:
  const std::string* TokenString(int32_t id) const {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return &added_[it->second].decode_form;
    return model_->IdToToken(id);
  }
  // HF AddedVocabulary::find_matches: splits `s` into plain text and added tokens.
  void SplitAdded(std::string_view s, const LiteralMatcher& matcher, bool at_origin,
                  std::vector<Segment>* out) const;
  void EncodePlain(const std::string& normalized, bool at_origin, std::vector<int32_t>* ids) const;

  std::unique_ptr<tok::Normalizer> normalizer_;
  std::unique_ptr<tok::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tok::BpeModel> model_;
  std::unique_ptr<tok::Decoder> decoder_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;
  absl::flat_hash_map<std::string, size_t> added_by_content_;
  absl::flat_hash_set<std::string> special_contents_;
  LiteralMatcher raw_matcher_;         // normalized == false tokens, on the input text
  LiteralMatcher normalized_matcher_;  // normalized == true tokens, on normalized text
  std::vector<int32_t> prefix_ids_;    // added by the post-processor (add_special_tokens)
  std::vector<int32_t> suffix_ids_;
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_, eos_id_;
  std::string kind_;
};

// Parses a post-processor into the special ids it puts before / after the sequence.
absl::Status ParsePostProcessor(const json& j, const std::string& field, const ParseContext& ctx,
                                std::vector<int32_t>* prefix, std::vector<int32_t>* suffix) {
  if (j.is_null()) return absl::OkStatus();
  SP_ASSIGN_OR_RETURN(std::string type, tok::GetType(j, field, ctx));
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (type == "Sequence") {
    if (!j.contains("processors") || !j.at("processors").is_array()) {
      return ctx.Error(field + ".processors", "expected an array");
    }
    const json& items = j.at("processors");
    for (size_t i = 0; i < items.size(); ++i) {
      std::vector<int32_t> p, s;
      SP_RETURN_IF_ERROR(
          ParsePostProcessor(items[i], absl::StrCat(field, ".processors[", i, "]"), ctx, &p, &s));
      prefix->insert(prefix->begin(), p.begin(), p.end());
      suffix->insert(suffix->end(), s.begin(), s.end());
    }
    return absl::OkStatus();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    // {"sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}: single = cls A sep.
    auto read = [&](const char* key) -> absl::StatusOr<int32_t> {
      std::string f = absl::StrCat(field, ".", key);
      if (!j.contains(key) || !j.at(key).is_array() || j.at(key).size() != 2 ||
          !j.at(key)[1].is_number_integer()) {
        return ctx.Error(f, "expected [token, id]");
      }
      return j.at(key)[1].get<int32_t>();
    };
    SP_ASSIGN_OR_RETURN(int32_t cls, read("cls"));
    SP_ASSIGN_OR_RETURN(int32_t sep, read("sep"));
    prefix->push_back(cls);
    suffix->push_back(sep);
    return absl::OkStatus();
  }
  if (type == "TemplateProcessing") {
    if (!j.contains("single") || !j.at("single").is_array()) {
      return ctx.Error(field + ".single", "expected an array");
    }
    const json* specials = j.contains("special_tokens") ? &j.at("special_tokens") : nullptr;
    const json& single = j.at("single");
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); ++i) {
      std::string f = absl::StrCat(field, ".single[", i, "]");
      const json& piece = single[i];
      if (piece.is_object() && piece.contains("Sequence")) {
        const json& seq = piece.at("Sequence");
        if (!seq.is_object() || !seq.contains("id") || seq.at("id") != "A" || seen_sequence) {
          return ctx.Error(f, "a single-sequence template must contain sequence A exactly once");
        }
        seen_sequence = true;
      } else if (piece.is_object() && piece.contains("SpecialToken")) {
        const json& st = piece.at("SpecialToken");
        if (!st.is_object() || !st.contains("id") || !st.at("id").is_string()) {
          return ctx.Error(f + ".SpecialToken.id", "expected a string");
        }
        std::string name = st.at("id").get<std::string>();
        if (specials == nullptr || !specials->is_object() || !specials->contains(name) ||
            !specials->at(name).contains("ids") || !specials->at(name).at("ids").is_array()) {
          return ctx.Error(field + ".special_tokens",
                           absl::StrCat("no ids for special token \"", name, "\""));
        }
        std::vector<int32_t>& dst = seen_sequence ? *suffix : *prefix;
        for (const json& id : specials->at(name).at("ids")) {
          if (!id.is_number_integer()) {
            return ctx.Error(field + ".special_tokens", absl::StrCat("bad id for \"", name, "\""));
          }
          dst.push_back(id.get<int32_t>());
        }
      } else {
        return ctx.Error(f, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
    }
    if (!seen_sequence) return ctx.Error(field + ".single", "no sequence A in the template");
    return absl::OkStatus();
  }
  return ctx.Error(field + ".type", absl::StrCat("unsupported post-processor type \"", type, "\""));
}

// tokenizer_config's bos_token / eos_token: a string or {"content": ...}.
std::optional<std::string> ConfigTokenName(const json* config, const char* key) {
  if (config == nullptr || !config->is_object() || !config->contains(key)) return std::nullopt;
  const json& v = config->at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
    return v.at("content").get<std::string>();
  }
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Parse(const json& j, const json* config,
                                                                const ParseContext& ctx,
                                                                const ParseContext& config_ctx) {
  if (!j.is_object()) return ctx.Error("(root)", "expected a JSON object");
  std::unique_ptr<HfTokenizer> t(new HfTokenizer());
  static const json kNull;
  auto field = [&](const char* key) -> const json& { return j.contains(key) ? j.at(key) : kNull; };

  if (!j.contains("model")) return ctx.Error("model", "missing");
  SP_ASSIGN_OR_RETURN(t->model_, tok::BpeModel::Parse(j.at("model"), ctx));
  SP_ASSIGN_OR_RETURN(t->normalizer_, tok::ParseNormalizer(field("normalizer"), "normalizer", ctx));
  SP_ASSIGN_OR_RETURN(t->pre_tokenizer_,
                      tok::ParsePreTokenizer(field("pre_tokenizer"), "pre_tokenizer", ctx));
  SP_ASSIGN_OR_RETURN(t->decoder_, tok::ParseDecoder(field("decoder"), "decoder", ctx));
  SP_RETURN_IF_ERROR(ParsePostProcessor(field("post_processor"), "post_processor", ctx,
                                        &t->prefix_ids_, &t->suffix_ids_));

  // added_tokens
  const json& added = field("added_tokens");
  if (!added.is_null() && !added.is_array()) return ctx.Error("added_tokens", "expected an array");
  int32_t max_id = t->model_->max_id();
  if (added.is_array()) {
    for (size_t i = 0; i < added.size(); ++i) {
      std::string f = absl::StrCat("added_tokens[", i, "]");
      const json& a = added[i];
      if (!a.is_object() || !a.contains("id") || !a.at("id").is_number_integer() ||
          a.at("id").get<int64_t>() < 0 ||
          a.at("id").get<int64_t>() >= tok::BpeModel::kMaxTokenId) {
        return ctx.Error(f + ".id", "expected an integer in [0, 2^24)");
      }
      AddedToken tk;
      tk.id = a.at("id").get<int32_t>();
      SP_ASSIGN_OR_RETURN(tk.content, tok::GetString(a, "content", f, ctx));
      SP_ASSIGN_OR_RETURN(tk.special, tok::GetBool(a, "special", false, f, ctx));
      SP_ASSIGN_OR_RETURN(tk.single_word, tok::GetBool(a, "single_word", false, f, ctx));
      SP_ASSIGN_OR_RETURN(tk.lstrip, tok::GetBool(a, "lstrip", false, f, ctx));
      SP_ASSIGN_OR_RETURN(tk.rstrip, tok::GetBool(a, "rstrip", false, f, ctx));
      SP_ASSIGN_OR_RETURN(tk.normalized, tok::GetBool(a, "normalized", !tk.special, f, ctx));
      if (t->added_by_id_.contains(tk.id)) {
        return ctx.Error(f + ".id", absl::StrCat("duplicate added token id ", tk.id));
      }
      max_id = std::max(max_id, tk.id);
      size_t index = t->added_.size();
      t->added_by_id_[tk.id] = index;
      t->added_by_content_.emplace(tk.content, index);
      if (tk.special) t->special_contents_.insert(tk.content);
      t->added_.push_back(std::move(tk));
    }
  }
  for (size_t i = 0; i < t->added_.size(); ++i) {
    AddedToken& tk = t->added_[i];
    tk.decode_form = tk.content;
    if (tk.normalized) {
      std::string pattern = tk.content;
      if (t->normalizer_) t->normalizer_->Normalize(&pattern);
      tk.decode_form = pattern;
      t->normalized_matcher_.Add(std::move(pattern), static_cast<int>(i));
    } else {
      t->raw_matcher_.Add(tk.content, static_cast<int>(i));
    }
  }
  t->vocab_size_ = max_id + 1;

  bool byte_level = (t->pre_tokenizer_ && t->pre_tokenizer_->IsByteLevel()) ||
                    (t->decoder_ && t->decoder_->IsByteLevel());
  t->kind_ = byte_level ? "byte-level-bpe" : "sentencepiece-bpe";

  // tokenizer_config.json
  std::optional<int32_t> cfg_bos, cfg_eos;
  if (auto name = ConfigTokenName(config, "bos_token")) cfg_bos = t->TokenToId(*name);
  if (auto name = ConfigTokenName(config, "eos_token")) cfg_eos = t->TokenToId(*name);
  std::optional<int32_t> template_bos, template_eos;
  if (!t->prefix_ids_.empty()) template_bos = t->prefix_ids_.front();
  if (!t->suffix_ids_.empty()) template_eos = t->suffix_ids_.back();
  t->bos_id_ = cfg_bos ? cfg_bos : template_bos;
  t->eos_id_ = cfg_eos ? cfg_eos : template_eos;
  if (!t->eos_id_) {
    for (const char* name : {"</s>", "<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<eos>"}) {
      if (auto id = t->TokenToId(name)) {
        t->eos_id_ = id;
        break;
      }
    }
  }
  if (config != nullptr && config->is_object()) {
    for (const char* key : {"add_bos_token", "add_eos_token"}) {
      if (!config->contains(key) || config->at(key).is_null()) continue;
      if (!config->at(key).is_boolean()) return config_ctx.Error(key, "expected a boolean");
      bool add = config->at(key).get<bool>();
      bool bos = key[4] == 'b';
      std::vector<int32_t>& dst = bos ? t->prefix_ids_ : t->suffix_ids_;
      dst.clear();
      if (add) {
        std::optional<int32_t> id = bos ? t->bos_id_ : t->eos_id_;
        if (!id) {
          return config_ctx.Error(key, absl::StrCat("is true but the tokenizer has no ",
                                                    bos ? "bos_token" : "eos_token"));
        }
        dst.push_back(*id);
      }
    }
  }
  return t;
}

void HfTokenizer::SplitAdded(std::string_view s, const LiteralMatcher& matcher, bool at_origin,
                             std::vector<Segment>* out) const {
  if (s.empty()) return;
  if (matcher.empty()) {
    out->push_back(Segment{s, -1, at_origin});
    return;
  }
  size_t start_offset = 0, pos = 0;
  while (pos < s.size()) {
    size_t len = 0;
    int index = matcher.LongestAt(s, pos, &len);
    if (index < 0) {
      ++pos;
      continue;
    }
    const AddedToken& tk = added_[index];
    size_t start = pos, stop = pos + len;
    if (tk.single_word) {
      bool start_ok = start == 0 || !EndsWithWordChar(s.substr(0, start));
      bool stop_ok = stop == s.size() || !StartsWithWordChar(s.substr(stop));
      if (!start_ok || !stop_ok) {
        pos = stop;  // Aho-Corasick resumes after the discarded match
        continue;
      }
    }
    if (tk.lstrip) start = std::max(TrailingSpaceStart(s.substr(0, start)), start_offset);
    if (tk.rstrip) stop += LeadingSpaceLen(s.substr(stop));
    if (start_offset < start) {
      out->push_back(Segment{s.substr(start_offset, start - start_offset), -1,
                             at_origin && start_offset == 0});
    }
    out->push_back(Segment{s.substr(start, stop - start), tk.id, false});
    start_offset = stop;
    pos = stop;
  }
  if (start_offset < s.size()) {
    out->push_back(Segment{s.substr(start_offset), -1, at_origin && start_offset == 0});
  }
}

void HfTokenizer::EncodePlain(const std::string& text, bool at_origin,
                              std::vector<int32_t>* ids) const {
  std::vector<tok::Piece> pieces;
  pieces.push_back(tok::Piece{text, at_origin});
  if (pre_tokenizer_) pre_tokenizer_->PreTokenize(&pieces);
  for (const tok::Piece& p : pieces) model_->Tokenize(p.text, ids);
}

std::vector<int32_t> HfTokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::string owned;
  if (!tok::IsValidUtf8(text)) {
    owned = tok::Utf8Lossy(text);
    text = owned;
  }
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  std::vector<Segment> raw, norm;
  SplitAdded(text, raw_matcher_, true, &raw);
  for (const Segment& seg : raw) {
    if (seg.id >= 0) {
      ids.push_back(seg.id);
      continue;
    }
    std::string normalized(seg.text);
    if (normalizer_) normalizer_->Normalize(&normalized);
    norm.clear();
    SplitAdded(normalized, normalized_matcher_, seg.at_origin, &norm);
    for (const Segment& sub : norm) {
      if (sub.id >= 0) {
        ids.push_back(sub.id);
      } else {
        EncodePlain(std::string(sub.text), sub.at_origin, &ids);
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

std::string HfTokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* t = TokenString(id);
    if (t == nullptr) continue;  // unknown ids are dropped, as in HF
    if (skip_special_tokens && special_contents_.contains(*t)) continue;
    tokens.push_back(*t);
  }
  if (decoder_) {
    decoder_->DecodeChain(&tokens);
    std::string out;
    for (const std::string& t : tokens) out.append(t);
    return out;
  }
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i > 0) out.push_back(' ');
    out.append(tokens[i]);
  }
  return out;
}

std::string ConfigSource(const std::string& source) {
  const std::string name = "tokenizer.json";
  if (EndsWith(source, name)) {
    return source.substr(0, source.size() - name.size()) + "tokenizer_config.json";
  }
  return source + " (tokenizer_config.json)";
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ss.str();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::string_view tokenizer_config_json,
    const std::string& source) {
  ParseContext ctx{source};
  ParseContext config_ctx{ConfigSource(source)};
  json j, config;
  try {
    j = json::parse(tokenizer_json.begin(), tokenizer_json.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON: ", e.what()));
  }
  bool has_config = false;
  if (tokenizer_config_json.find_first_not_of(" \t\r\n") != std::string_view::npos) {
    try {
      config = json::parse(tokenizer_config_json.begin(), tokenizer_config_json.end());
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_ctx.source, ": invalid JSON: ", e.what()));
    }
    if (!config.is_object()) return config_ctx.Error("(root)", "expected a JSON object");
    has_config = true;
  }
  try {
    SP_ASSIGN_OR_RETURN(auto t,
                        HfTokenizer::Parse(j, has_config ? &config : nullptr, ctx, config_ctx));
    return std::unique_ptr<Tokenizer>(std::move(t));
  } catch (const json::exception& e) {
    // Defensive: the parsers check types before reading, so this should not happen.
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": unexpected JSON content: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  SP_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  std::string config;
  const std::string config_path = dir + "/tokenizer_config.json";
  if (std::ifstream(config_path).good()) {
    SP_ASSIGN_OR_RETURN(config, ReadFile(config_path));
  }
  return FromJson(text, config, path);
}

// ---------------------------------------------------------------- DecodeStream
//
// vLLM/TGI-style: ids_[prefix_offset_, read_offset_) is text already emitted (kept as
// context so that decoders that look at the first token, like Strip or Metaspace, and
// multi-token characters decode the same way), ids_[read_offset_, end) is pending.
// The initial context is the last 5 prompt tokens, not counting trailing special tokens
// when they are skipped, widened until it starts on a character boundary.

namespace {
constexpr size_t kInitialWindow = 5;
constexpr size_t kMaxWindowWidening = 64;
}  // namespace

DecodeStream::DecodeStream(const Tokenizer* tokenizer, absl::Span<const int32_t> prompt_ids,
                           bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {
  ids_.assign(prompt_ids.begin(), prompt_ids.end());
  read_offset_ = ids_.size();
  // The context window is the last kInitialWindow prompt tokens that are not skipped
  // special tokens (a window of only skipped special tokens would decode to "" and lose
  // the space that a Strip/Metaspace decoder removes from the first token).
  size_t visible_end = read_offset_;
  if (skip_special_) {
    while (visible_end > 0 && tokenizer_->IsSpecial(ids_[visible_end - 1])) --visible_end;
  }
  prefix_offset_ = visible_end > kInitialWindow ? visible_end - kInitialWindow : 0;
  // Widen it until it starts on a character boundary and contains visible text (e.g.
  // not in the middle of a multi-token byte-fallback character).
  for (size_t k = 0; k < kMaxWindowWidening && prefix_offset_ > 0; ++k) {
    std::string text = tokenizer_->Decode(
        absl::MakeConstSpan(ids_).subspan(prefix_offset_, read_offset_ - prefix_offset_),
        skip_special_);
    if (!text.empty() && !StartsWith(text, tok::kReplacementChar)) break;
    --prefix_offset_;
  }
  ids_.erase(ids_.begin(), ids_.begin() + prefix_offset_);
  read_offset_ -= prefix_offset_;
  prefix_offset_ = 0;
}

std::string DecodeStream::Step(int32_t id) {
  ids_.push_back(id);
  return Advance(/*flush=*/false);
}

std::string DecodeStream::Flush() {
  if (read_offset_ >= ids_.size()) return std::string();
  return Advance(/*flush=*/true);
}

std::string DecodeStream::Advance(bool flush) {
  auto all = absl::MakeConstSpan(ids_);
  std::string prefix_text =
      tokenizer_->Decode(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_);
  std::string new_text = tokenizer_->Decode(all.subspan(prefix_offset_), skip_special_);
  if (new_text.size() <= prefix_text.size()) return std::string();
  if (!flush && EndsWith(new_text, tok::kReplacementChar)) return std::string();  // incomplete
  std::string piece;
  if (StartsWith(new_text, prefix_text)) {
    piece = new_text.substr(prefix_text.size());
  } else {
    // The context re-decoded differently (only with invalid byte sequences): emit what
    // differs, starting on a character boundary so the output stays valid UTF-8.
    size_t common = 0;
    while (common < prefix_text.size() && prefix_text[common] == new_text[common]) ++common;
    piece = new_text.substr(tok::Utf8BoundaryPrefix(new_text, common));
  }
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  ids_.erase(ids_.begin(), ids_.begin() + prefix_offset_);
  read_offset_ -= prefix_offset_;
  prefix_offset_ = 0;
  return piece;
}

}  // namespace superpose::engine
