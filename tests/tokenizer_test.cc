// Tokenizer tests against real tokenizer.json files and reference ids made with the
// Hugging Face `tokenizers` library / transformers (see shared/fixtures/SOURCES.md).
//
// Decode expectations (what HF guarantees, and so what is asserted here):
// - extra_cases.json: decode(ids_with_special, skip_special_tokens=true) == "decoded"
//   (computed by HF itself).
// - cases.json, byte-level tokenizers (gpt-2, falcon): decode(ids) == text exactly: the
//   byte-level alphabet round-trips every byte. gpt-neox has an NFC normalizer, so its
//   decode gives NFC(text) (asserted as such; equal to text when NFC does not change it).
// - cases.json, SentencePiece-style tokenizers (llama-spm, phi-3): the normalizer prepends
//   "▁" to every run of text between added tokens and the decoder strips one leading
//   space of the whole output only. So decode(ids) == text, except that every run of text
//   that follows an added token (e.g. "</s>" inside the text) gains one leading space.
// - stories260k golden: decode(prompt_ids + completion_ids, skip) == full_text.
//
// TokenizerDifferential compares with a file of HF results on random text when
// SP_TOKENIZER_DIFF_FILE is set (skipped otherwise; see the test for the format).

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/tokenizer.h"
#include "engine/model/tokenizer_components.h"
#include "engine/model/tokenizer_unicode.h"

namespace superpose::engine {
namespace {

using json = nlohmann::json;

std::string FixturesDir() { return std::string(SP_SHARED_DIR) + "/fixtures"; }
std::string TokenizerDir(const std::string& name) { return FixturesDir() + "/tokenizers/" + name; }
std::string StoriesDir() { return FixturesDir() + "/stories260k"; }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json ReadJson(const std::string& path) { return json::parse(ReadFile(path)); }

std::unique_ptr<Tokenizer> Load(const std::string& dir) {
  auto t = Tokenizer::FromDir(dir);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

// The tokenizers are big; parse each once.
const Tokenizer& Cached(const std::string& dir) {
  static auto* cache = new std::map<std::string, std::unique_ptr<Tokenizer>>();
  auto& slot = (*cache)[dir];
  if (!slot) slot = Load(dir);
  if (!slot) {
    ADD_FAILURE() << "cannot load " << dir;
    std::abort();
  }
  return *slot;
}

std::string Quote(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::vector<int32_t> Ids(const json& j) { return j.get<std::vector<int32_t>>(); }

// "[15043 '▁Hello', 3186 '▁world']" with a marker at the first difference.
std::string Describe(const Tokenizer& t, const std::vector<int32_t>& ids, size_t mark = SIZE_MAX) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ", ";
    if (i == mark) out += ">>>";
    out += std::to_string(ids[i]) + " " + Quote(t.IdToToken(ids[i]));
  }
  return out + "]";
}

size_t FirstDiff(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t i = 0;
  while (i < a.size() && i < b.size() && a[i] == b[i]) ++i;
  return i;
}

// Returns true when equal; otherwise reports a readable diff.
bool CheckIds(const Tokenizer& t, const std::string& what, size_t index, const std::string& text,
              const std::vector<int32_t>& expected, const std::vector<int32_t>& actual) {
  if (expected == actual) return true;
  size_t d = FirstDiff(expected, actual);
  ADD_FAILURE() << what << " case " << index << " text=" << Quote(text)
                << "\n  first difference at position " << d
                << "\n  expected: " << Describe(t, expected, d)
                << "\n  actual:   " << Describe(t, actual, d);
  return false;
}

bool CheckText(const std::string& what, size_t index, const std::string& expected,
               const std::string& actual) {
  if (expected == actual) return true;
  ADD_FAILURE() << what << " case " << index << "\n  expected: " << Quote(expected)
                << "\n  actual:   " << Quote(actual);
  return false;
}

const std::vector<std::string> kFixtureTokenizers = {"llama-spm", "phi-3", "gpt-2", "gpt-neox",
                                                     "falcon"};

bool IsSentencePiece(const std::string& name) { return name == "llama-spm" || name == "phi-3"; }

// Expected decode(ids, skip_special_tokens=false) of a cases.json text for the
// SentencePiece-style tokenizers: every run of text after an added token gets the "▁"
// the Prepend normalizer adds to it, decoded as a space (see the header comment).
std::string SpmExpectedDecode(const std::string& text, const std::vector<std::string>& added) {
  std::string out;
  size_t i = 0;
  bool after_token = false;
  while (i < text.size()) {
    size_t best = 0;
    for (const std::string& a : added) {
      if (a.size() > best && text.compare(i, a.size(), a) == 0) best = a.size();
    }
    if (best > 0) {
      out.append(text, i, best);
      i += best;
      after_token = true;
      continue;
    }
    if (after_token) out.push_back(' ');
    after_token = false;
    out.push_back(text[i++]);
  }
  return out;
}

class FixtureTokenizerTest : public ::testing::TestWithParam<std::string> {};

TEST_P(FixtureTokenizerTest, CasesEncodeAndDecode) {
  const std::string name = GetParam();
  const Tokenizer& t = Cached(TokenizerDir(name));
  json cases = ReadJson(TokenizerDir(name) + "/cases.json");
  ASSERT_TRUE(cases.is_array());
  ASSERT_FALSE(cases.empty());
  size_t encode_ok = 0, decode_ok = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string text = cases[i]["text"].get<std::string>();
    const std::vector<int32_t> ids = Ids(cases[i]["ids"]);
    if (CheckIds(t, name + " cases.json encode", i, text, ids, t.Encode(text, false))) ++encode_ok;

    std::string expected;
    if (IsSentencePiece(name)) {
      expected = SpmExpectedDecode(text, {"<unk>", "<s>", "</s>"});
    } else if (name == "gpt-neox") {
      expected = tok::UnicodeNormalize(text, tok::NormalForm::kNFC);
    } else {
      expected = text;
    }
    if (CheckText(name + " cases.json decode", i, expected, t.Decode(ids, false))) ++decode_ok;
  }
  std::printf("[ %-9s ] cases.json: %zu/%zu encode, %zu/%zu decode\n", name.c_str(), encode_ok,
              cases.size(), decode_ok, cases.size());
  EXPECT_EQ(encode_ok, cases.size());
  EXPECT_EQ(decode_ok, cases.size());
}

TEST_P(FixtureTokenizerTest, ExtraCasesEncodeAndDecode) {
  const std::string name = GetParam();
  const Tokenizer& t = Cached(TokenizerDir(name));
  json cases = ReadJson(TokenizerDir(name) + "/extra_cases.json");
  ASSERT_TRUE(cases.is_array());
  ASSERT_FALSE(cases.empty());
  size_t plain_ok = 0, special_ok = 0, decode_ok = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string text = cases[i]["text"].get<std::string>();
    const auto ids = Ids(cases[i]["ids"]);
    const auto ids_special = Ids(cases[i]["ids_with_special"]);
    const std::string decoded = cases[i]["decoded"].get<std::string>();
    if (CheckIds(t, name + " extra (no special)", i, text, ids, t.Encode(text, false))) ++plain_ok;
    if (CheckIds(t, name + " extra (with special)", i, text, ids_special, t.Encode(text, true))) {
      ++special_ok;
    }
    if (CheckText(name + " extra decode(skip_special)", i, decoded, t.Decode(ids_special, true))) {
      ++decode_ok;
    }
  }
  std::printf("[ %-9s ] extra_cases.json: %zu/%zu encode, %zu/%zu encode+special, %zu/%zu decode\n",
              name.c_str(), plain_ok, cases.size(), special_ok, cases.size(), decode_ok,
              cases.size());
  EXPECT_EQ(plain_ok, cases.size());
  EXPECT_EQ(special_ok, cases.size());
  EXPECT_EQ(decode_ok, cases.size());
}

// Streaming: for every extra case, the prompt is the first half of the ids and the rest
// is streamed; the pieces are valid UTF-8 and add up to decode(all) - decode(prompt).
TEST_P(FixtureTokenizerTest, DecodeStreamMatchesDecode) {
  const std::string name = GetParam();
  const Tokenizer& t = Cached(TokenizerDir(name));
  json cases = ReadJson(TokenizerDir(name) + "/extra_cases.json");
  ASSERT_TRUE(cases.is_array());
  ASSERT_FALSE(cases.empty());
  size_t checked = 0;
  for (bool skip : {true, false}) {
    for (size_t i = 0; i < cases.size(); ++i) {
      const auto ids = Ids(cases[i]["ids_with_special"]);
      for (size_t cut : {size_t{0}, ids.size() / 2, ids.size() > 0 ? ids.size() - 1 : 0}) {
        std::vector<int32_t> prompt(ids.begin(), ids.begin() + cut);
        std::string full = t.Decode(ids, skip);
        std::string head = t.Decode(prompt, skip);
        DecodeStream stream(&t, prompt, skip);
        std::string streamed;
        for (size_t k = cut; k < ids.size(); ++k) {
          std::string piece = stream.Step(ids[k]);
          EXPECT_TRUE(tok::IsValidUtf8(piece))
              << name << " case " << i << " piece " << Quote(piece);
          streamed += piece;
        }
        std::string rest = stream.Flush();
        EXPECT_TRUE(tok::IsValidUtf8(rest));
        streamed += rest;
        if (full.compare(0, head.size(), head) == 0) {
          EXPECT_EQ(streamed, full.substr(head.size()))
              << name << " case " << i << " cut " << cut << " skip " << skip;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, cases.size());
}

TEST_P(FixtureTokenizerTest, Metadata) {
  const std::string name = GetParam();
  const Tokenizer& t = Cached(TokenizerDir(name));
  if (name == "llama-spm") {
    EXPECT_EQ(t.kind(), "sentencepiece-bpe");
    EXPECT_EQ(t.vocab_size(), 32000);
    EXPECT_EQ(t.bos_id(), 1);
    EXPECT_EQ(t.eos_id(), 2);
    EXPECT_TRUE(t.IsSpecial(1));
    EXPECT_FALSE(t.IsSpecial(15043));
    EXPECT_EQ(t.IdToToken(15043), "\xE2\x96\x81Hello");
    EXPECT_EQ(t.TokenToId("\xE2\x96\x81Hello"), 15043);
    EXPECT_EQ(t.TokenToId("<0x0A>"), 13);
  } else if (name == "phi-3") {
    EXPECT_EQ(t.kind(), "sentencepiece-bpe");
    EXPECT_EQ(t.vocab_size(), 32011);
    EXPECT_EQ(t.bos_id(), 1);      // tokenizer_config bos_token
    EXPECT_EQ(t.eos_id(), 32000);  // tokenizer_config eos_token <|endoftext|>
    EXPECT_FALSE(t.IsSpecial(2));  // </s> is an added token but not special in phi-3
    EXPECT_TRUE(t.IsSpecial(32007));
    EXPECT_EQ(t.IdToToken(32010), "<|user|>");
    // add_bos_token=false: no BOS even with add_special_tokens.
    EXPECT_EQ(t.Encode("Hello", true), std::vector<int32_t>({15043}));
  } else if (name == "gpt-2") {
    EXPECT_EQ(t.kind(), "byte-level-bpe");
    EXPECT_EQ(t.vocab_size(), 50257);
    EXPECT_EQ(t.bos_id(), std::nullopt);  // no tokenizer_config, no template
    EXPECT_EQ(t.eos_id(), 50256);
    EXPECT_TRUE(t.IsSpecial(50256));
    EXPECT_EQ(t.IdToToken(220), "\xC4\xA0");  // "Ġ"
  } else if (name == "gpt-neox") {
    EXPECT_EQ(t.kind(), "byte-level-bpe");
    EXPECT_EQ(t.vocab_size(), 50277);
    EXPECT_EQ(t.eos_id(), 0);
    EXPECT_FALSE(t.IsSpecial(50276));
    EXPECT_EQ(t.IdToToken(50276), "  ");
  } else if (name == "falcon") {
    EXPECT_EQ(t.kind(), "byte-level-bpe");
    EXPECT_EQ(t.vocab_size(), 65024);
    EXPECT_EQ(t.eos_id(), 11);
  }
  EXPECT_EQ(t.IdToToken(-1), "");
  EXPECT_EQ(t.IdToToken(t.vocab_size()), "");
  EXPECT_EQ(t.TokenToId("this token does not exist"), std::nullopt);
  EXPECT_EQ(t.Decode({t.vocab_size() + 5}, false), "");  // unknown ids are dropped
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureTokenizerTest, ::testing::ValuesIn(kFixtureTokenizers),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n) {
                             if (c == '-') c = '_';
                           }
                           return n;
                         });

// Opt-in differential check against the real HF `tokenizers` library: set
// SP_TOKENIZER_DIFF_FILE to a JSON file {name: {dir, cases: [{text, ids,
// ids_with_special, decoded, decoded_noskip}], decodes: [{ids, skip, noskip}]}} made with
// HF (e.g. the npm package `tokenizers`: Tokenizer.fromFile(dir + "/tokenizer.json"),
// encode(text, null, {addSpecialTokens}), decode(ids, skip)) on random text. The
// tokenizer_config.json is not applied, like in HF's library itself.
TEST(TokenizerDifferential, MatchesHfOnFile) {
  const char* path = std::getenv("SP_TOKENIZER_DIFF_FILE");
  if (path == nullptr || *path == 0) GTEST_SKIP() << "SP_TOKENIZER_DIFF_FILE not set";
  json all = ReadJson(path);
  ASSERT_FALSE(all.empty()) << path << " lists no tokenizer";
  for (auto it = all.begin(); it != all.end(); ++it) {
    const std::string name = it.key();
    const std::string dir = it.value()["dir"].get<std::string>();
    auto loaded = Tokenizer::FromJson(ReadFile(dir + "/tokenizer.json"), "", dir);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    const Tokenizer& t = **loaded;
    size_t ok = 0, total = 0, failures = 0;
    auto check = [&](bool good, const std::function<std::string()>& what) {
      ++total;
      if (good) {
        ++ok;
      } else if (++failures <= 10) {
        ADD_FAILURE() << name << ": " << what();
      }
    };
    const json& cases = it.value()["cases"];
    ASSERT_FALSE(cases.empty()) << name << ": no cases";
    for (size_t i = 0; i < cases.size(); ++i) {
      const json& c = cases[i];
      const std::string text = c["text"].get<std::string>();
      for (bool special : {false, true}) {
        const auto expected = Ids(c[special ? "ids_with_special" : "ids"]);
        const auto actual = t.Encode(text, special);
        check(expected == actual, [&] {
          return "case " + std::to_string(i) + (special ? " (special)" : "") + " " + Quote(text) +
                 "\n  expected: " + Describe(t, expected, FirstDiff(expected, actual)) +
                 "\n  actual:   " + Describe(t, actual, FirstDiff(expected, actual));
        });
      }
      const auto ids = Ids(c["ids_with_special"]);
      for (bool skip : {true, false}) {
        const std::string expected = c[skip ? "decoded" : "decoded_noskip"].get<std::string>();
        const std::string actual = t.Decode(ids, skip);
        check(expected == actual, [&] {
          return "decode case " + std::to_string(i) + " skip=" + std::to_string(skip) +
                 "\n  expected: " + Quote(expected) + "\n  actual:   " + Quote(actual);
        });
      }
    }
    const json& decodes = it.value()["decodes"];
    for (size_t i = 0; i < decodes.size(); ++i) {
      const auto ids = Ids(decodes[i]["ids"]);
      for (bool skip : {true, false}) {
        const std::string expected = decodes[i][skip ? "skip" : "noskip"].get<std::string>();
        const std::string actual = t.Decode(ids, skip);
        check(expected == actual, [&] {
          return "decode ids " + Describe(t, ids) + " skip=" + std::to_string(skip) +
                 "\n  expected: " + Quote(expected) + "\n  actual:   " + Quote(actual);
        });
      }
    }
    std::printf("[ %-11s ] differential: %zu/%zu match HF\n", name.c_str(), ok, total);
    EXPECT_EQ(ok, total) << name;
  }
}

// ---------------------------------------------------------------- stories260k

TEST(Stories260kTokenizer, GoldenPromptsAndFullText) {
  const Tokenizer& t = Cached(StoriesDir());
  EXPECT_EQ(t.kind(), "sentencepiece-bpe");
  EXPECT_EQ(t.vocab_size(), 512);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  json golden = ReadJson(StoriesDir() + "/golden.json");
  const json& gen = golden["generation"];
  ASSERT_TRUE(gen.is_array());
  ASSERT_FALSE(gen.empty());
  size_t ok = 0;
  for (size_t i = 0; i < gen.size(); ++i) {
    const std::string prompt = gen[i]["prompt"].get<std::string>();
    const auto prompt_ids = Ids(gen[i]["prompt_ids"]);
    const auto completion = Ids(gen[i]["completion_ids"]);
    bool good =
        CheckIds(t, "stories260k golden prompt", i, prompt, prompt_ids, t.Encode(prompt, true));
    std::vector<int32_t> all = prompt_ids;
    all.insert(all.end(), completion.begin(), completion.end());
    good &= CheckText("stories260k full_text", i, gen[i]["full_text"].get<std::string>(),
                      t.Decode(all, true));
    good &=
        CheckText("stories260k completion_text", i, gen[i]["completion_text"].get<std::string>(),
                  t.Decode(all, true).substr(t.Decode(prompt_ids, true).size()));
    ok += good;
  }
  // Tokenizer cases, if the golden file carries any ({text, ids} with BOS).
  size_t extra = 0;
  for (const char* key : {"tokenizer", "tokenizer_fuzz"}) {
    if (!golden.contains(key) || !golden[key].is_array()) continue;
    for (size_t i = 0; i < golden[key].size(); ++i) {
      const json& c = golden[key][i];
      if (!c.contains("text") || !c.contains("ids")) continue;
      extra += CheckIds(t, std::string("stories260k ") + key, i, c["text"], Ids(c["ids"]),
                        t.Encode(c["text"].get<std::string>(), true));
    }
  }
  std::printf("[ stories260k ] golden: %zu/%zu prompts+decode ok, %zu tokenizer cases ok\n", ok,
              gen.size(), extra);
  EXPECT_EQ(ok, gen.size());
}

TEST(Stories260kTokenizer, StreamingGoldenCompletion) {
  const Tokenizer& t = Cached(StoriesDir());
  json golden = ReadJson(StoriesDir() + "/golden.json");
  ASSERT_FALSE(golden["generation"].empty());
  for (const json& g : golden["generation"]) {
    DecodeStream stream(&t, Ids(g["prompt_ids"]), /*skip_special_tokens=*/true);
    std::string text;
    for (int32_t id : Ids(g["completion_ids"])) {
      std::string piece = stream.Step(id);
      EXPECT_TRUE(tok::IsValidUtf8(piece));
      text += piece;
    }
    text += stream.Flush();
    EXPECT_EQ(text, g["completion_text"].get<std::string>()) << g["name"];
  }
}

TEST(Stories260kTokenizer, StreamingEmojiFromByteFallback) {
  const Tokenizer& t = Cached(StoriesDir());
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600, not in the 512-piece vocab
  std::vector<int32_t> ids = t.Encode("Hi " + emoji + "!", true);
  // Byte-fallback ids are 3 + byte.
  auto first_byte = std::find(ids.begin(), ids.end(), 3 + 0xF0);
  ASSERT_NE(first_byte, ids.end()) << Describe(t, ids);
  size_t at = first_byte - ids.begin();
  ASSERT_LE(at + 4, ids.size());
  EXPECT_EQ(std::vector<int32_t>(ids.begin() + at, ids.begin() + at + 4),
            std::vector<int32_t>({3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80}));
  EXPECT_EQ(t.Decode(ids, true), "Hi " + emoji + "!");

  std::vector<int32_t> prompt(ids.begin(), ids.begin() + at);
  DecodeStream stream(&t, prompt, true);
  EXPECT_EQ(stream.Step(ids[at]), "");
  EXPECT_EQ(stream.Step(ids[at + 1]), "");
  EXPECT_EQ(stream.Step(ids[at + 2]), "");
  EXPECT_EQ(stream.Step(ids[at + 3]), emoji);
  std::string rest;
  for (size_t k = at + 4; k < ids.size(); ++k) rest += stream.Step(ids[k]);
  rest += stream.Flush();
  EXPECT_EQ(rest, "!");
}

TEST(Stories260kTokenizer, ByteFallbackInvalidSequences) {
  const Tokenizer& t = Cached(StoriesDir());
  const std::string fffd = "\xEF\xBF\xBD";
  auto byte = [](int b) { return 3 + b; };
  // HF ByteFallback: a group of byte tokens that is not valid UTF-8 gives one U+FFFD
  // per byte token.
  EXPECT_EQ(t.Decode({byte(0xE5)}, false), fffd);
  EXPECT_EQ(t.Decode({byte(0xE5), byte(0x8F)}, false), fffd + fffd);
  EXPECT_EQ(t.Decode({byte(0xE5), byte(0x8F), byte(0xAB)}, false), "\xE5\x8F\xAB");  // 叫
  const int32_t a = t.TokenToId("a").value();
  EXPECT_EQ(t.Decode({byte(0xE5), byte(0x8F), a}, false), fffd + fffd + "a");

  // A stream ending inside a character: nothing until Flush, which emits the U+FFFDs.
  DecodeStream stream(&t, {1}, true);
  EXPECT_EQ(stream.Step(byte(0xF0)), "");
  EXPECT_EQ(stream.Step(byte(0x9F)), "");
  EXPECT_EQ(stream.Flush(), fffd + fffd);
  EXPECT_EQ(stream.Flush(), "");
}

TEST(Stories260kTokenizer, InvalidUtf8InputIsReplacedLikeFromUtf8Lossy) {
  const Tokenizer& t = Cached(StoriesDir());
  // 0xFF is invalid; "\xF0\x9F" is a truncated 4-byte sequence: one U+FFFD each.
  EXPECT_EQ(t.Encode("a\xFF"
                     "b\xF0\x9F",
                     false),
            t.Encode("a\xEF\xBF\xBD"
                     "b\xEF\xBF\xBD",
                     false));
  EXPECT_EQ(tok::Utf8Lossy("a\xFF"
                           "b\xF0\x9F"),
            "a\xEF\xBF\xBD"
            "b\xEF\xBF\xBD");
  EXPECT_EQ(tok::Utf8Lossy("\xE0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // E0 needs A0..BF next
  EXPECT_EQ(tok::Utf8Lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate
}

TEST(Stories260kTokenizer, EncodeSpecialTokensInText) {
  const Tokenizer& t = Cached(StoriesDir());
  std::vector<int32_t> ids = t.Encode("<s>Once</s>", false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_EQ(t.Decode(ids, true), "Once");
  EXPECT_EQ(t.Encode("", true), std::vector<int32_t>({1}));
  EXPECT_EQ(t.Encode("", false), std::vector<int32_t>());
}

// ---------------------------------------------------------------- streaming (llama-spm)

TEST(DecodeStreamTest, LeadingSpaceAfterPromptAndSpecialTokens) {
  const Tokenizer& t = Cached(TokenizerDir("llama-spm"));
  const int32_t hello = 15043, world = 3186;  // "▁Hello", "▁world"
  {
    DecodeStream s(&t, {1}, true);  // only BOS: the first word loses its space, as in decode
    EXPECT_EQ(s.Step(hello), "Hello");
    EXPECT_EQ(s.Step(world), " world");
  }
  {
    DecodeStream s(&t, t.Encode("Say", true), true);
    EXPECT_EQ(s.Step(hello), " Hello");
  }
  {
    // The last 5+ prompt tokens are skipped special tokens: the window must widen.
    std::vector<int32_t> prompt = t.Encode("Say", true);
    for (int k = 0; k < 7; ++k) prompt.push_back(2);
    DecodeStream s(&t, prompt, true);
    EXPECT_EQ(s.Step(hello), " Hello");
    EXPECT_EQ(s.Step(2), "");
    EXPECT_EQ(s.Step(world), " world");
  }
  {
    // Far more skipped special tokens than any fixed window: still " Hello".
    std::vector<int32_t> prompt = t.Encode("Say", true);
    for (int k = 0; k < 200; ++k) prompt.push_back(2);
    std::vector<int32_t> all = prompt;
    all.push_back(hello);
    const std::string expected = t.Decode(all, true).substr(t.Decode(prompt, true).size());
    EXPECT_EQ(expected, " Hello");
    DecodeStream s(&t, prompt, true);
    EXPECT_EQ(s.Step(hello), expected);
  }
  {
    DecodeStream s(&t, {}, false);
    EXPECT_EQ(s.Step(1), "<s>");
    EXPECT_EQ(s.Step(hello), " Hello");
  }
}

TEST(DecodeStreamTest, ByteLevelMultiByteCharacters) {
  const Tokenizer& t = Cached(TokenizerDir("gpt-2"));
  const std::string text = "I \xF0\x9F\x98\x80 you \xE5\x8F\xAB \xF0\x9F\xA6\x99!";
  std::vector<int32_t> ids = t.Encode(text, false);
  DecodeStream s(&t, {}, false);
  std::string out;
  int empty_steps = 0;
  for (int32_t id : ids) {
    std::string piece = s.Step(id);
    EXPECT_TRUE(tok::IsValidUtf8(piece)) << Quote(piece);
    empty_steps += piece.empty();
    out += piece;
  }
  out += s.Flush();
  EXPECT_EQ(out, text);
  EXPECT_GT(empty_steps, 0);  // some emoji span several tokens
  // A lone partial character decodes to U+FFFD (lossy), and is emitted by Flush.
  std::vector<int32_t> partial(ids.begin(), ids.begin() + 2);
  DecodeStream p(&t, {}, false);
  std::string got;
  for (int32_t id : partial) got += p.Step(id);
  got += p.Flush();
  EXPECT_EQ(got, t.Decode(partial, false));
}

// ---------------------------------------------------------------- speed and threads

// ~100 KB of English-like text (deterministic).
std::string LongText() {
  json golden = ReadJson(StoriesDir() + "/golden.json");
  std::vector<std::string> words;
  auto add_words = [&words](const std::string& s) {
    std::string w;
    for (char c : s) {
      if (c == ' ' || c == '\n') {
        if (!w.empty()) words.push_back(w);
        w.clear();
      } else {
        w.push_back(c);
      }
    }
    if (!w.empty()) words.push_back(w);
  };
  // No added tokens (e.g. "<|endoftext|>", rstrip in phi-3): the text must round-trip.
  auto drop_added = [&words]() {
    words.erase(
        std::remove_if(words.begin(), words.end(),
                       [](const std::string& w) { return w.find('<') != std::string::npos; }),
        words.end());
  };
  for (const json& g : golden["generation"]) add_words(g["full_text"].get<std::string>());
  for (const json& c : ReadJson(TokenizerDir("gpt-2") + "/extra_cases.json")) {
    add_words(c["text"].get<std::string>());
  }
  drop_added();
  std::string text;
  uint64_t state = 12345;
  auto next = [&state]() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<uint32_t>(state >> 33);
  };
  size_t n = 0;
  while (text.size() < 100 * 1024) {
    text += words[next() % words.size()];
    ++n;
    text += (n % 17 == 0) ? "\n" : (n % 53 == 0) ? "  " : " ";
  }
  return text;
}

TEST(TokenizerSpeed, Encode100KB) {
  const std::string text = LongText();
  for (const std::string name : {"gpt-2", "llama-spm", "falcon", "gpt-neox", "phi-3"}) {
    const Tokenizer& t = Cached(TokenizerDir(name));
    auto t0 = std::chrono::steady_clock::now();
    std::vector<int32_t> ids = t.Encode(text, false);
    auto t1 = std::chrono::steady_clock::now();
    std::vector<int32_t> again = t.Encode(text, false);  // warm word cache
    auto t2 = std::chrono::steady_clock::now();
    std::string back = t.Decode(ids, false);
    auto t3 = std::chrono::steady_clock::now();
    auto ms = [](auto a, auto b) {
      return std::chrono::duration<double, std::milli>(b - a).count();
    };
    std::printf(
        "[ %-9s ] encode %zu bytes -> %zu tokens: %.1f ms (warm cache %.1f ms), "
        "decode %.1f ms\n",
        name.c_str(), text.size(), ids.size(), ms(t0, t1), ms(t1, t2), ms(t2, t3));
    EXPECT_EQ(ids, again);
    // Round trip (no added tokens in the text; gpt-neox normalizes to NFC).
    const std::string expected =
        name == "gpt-neox" ? tok::UnicodeNormalize(text, tok::NormalForm::kNFC) : text;
    if (back != expected) {
      size_t d = 0;
      while (d < back.size() && d < expected.size() && back[d] == expected[d]) ++d;
      size_t from = d > 40 ? d - 40 : 0;
      ADD_FAILURE() << name << ": decode(encode(text)) differs at byte " << d << " of "
                    << expected.size() << "\n  expected: " << Quote(expected.substr(from, 80))
                    << "\n  actual:   " << Quote(back.substr(from, 80));
    }
    EXPECT_GT(ids.size(), text.size() / 8);
  }
}

// Inputs that stress the pre-tokenizer regexes (long whitespace runs: PCRE2's JIT
// stack) and the BPE (one very long word): everything must round-trip.
TEST(TokenizerSpeed, PathologicalInputsRoundTrip) {
  std::string emoji;
  for (int k = 0; k < 20000; ++k) emoji += "\xF0\x9F\x98\x80";
  std::string mixed;
  for (int k = 0; k < 20000; ++k) mixed += (k % 3 == 0) ? "a  \n" : "b\t";
  const std::vector<std::pair<std::string, std::string>> inputs = {
      {"spaces", std::string(100000, ' ')},
      {"spaces+word", std::string(100000, ' ') + "word"},
      {"letters", std::string(100000, 'a')},
      {"digits", std::string(100000, '7')},
      {"newlines", std::string(50000, '\n')},
      {"emoji", emoji},
      {"mixed", mixed},
  };
  for (const std::string name : {"gpt-2", "gpt-neox", "falcon", "llama-spm"}) {
    const Tokenizer& t = Cached(TokenizerDir(name));
    for (const auto& [what, text] : inputs) {
      auto t0 = std::chrono::steady_clock::now();
      std::vector<int32_t> ids = t.Encode(text, false);
      auto t1 = std::chrono::steady_clock::now();
      std::printf("[ %-9s ] %-12s %7zu bytes -> %6zu tokens: %.1f ms\n", name.c_str(), what.c_str(),
                  text.size(), ids.size(),
                  std::chrono::duration<double, std::milli>(t1 - t0).count());
      EXPECT_FALSE(ids.empty()) << name << " " << what;
      EXPECT_TRUE(t.Decode(ids, false) == text) << name << " " << what << " does not round-trip";
    }
  }
}

TEST(TokenizerThreads, ConcurrentEncodeIsConsistent) {
  const Tokenizer& t = Cached(TokenizerDir("gpt-2"));
  json cases = ReadJson(TokenizerDir("gpt-2") + "/extra_cases.json");
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> expected;
  for (const json& c : cases) {
    texts.push_back(c["text"].get<std::string>());
    expected.push_back(Ids(c["ids"]));
  }
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k]() {
      for (int round = 0; round < 30; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          if (t.Encode(texts[(i + k) % texts.size()], false) != expected[(i + k) % texts.size()]) {
            ++failures[k];
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(failures[k], 0) << "thread " << k;
}

// ---------------------------------------------------------------- errors

TEST(TokenizerErrors, MalformedJsonNamesTheFile) {
  auto t = Tokenizer::FromJson("{\"model\": ", "", "/models/x/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("/models/x/tokenizer.json"), std::string::npos) << t.status();
  EXPECT_NE(t.status().message().find("invalid JSON"), std::string::npos) << t.status();
}

TEST(TokenizerErrors, MalformedConfigNamesTheConfigFile) {
  std::string good = ReadFile(StoriesDir() + "/tokenizer.json");
  auto t = Tokenizer::FromJson(good, "{oops", "/m/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("/m/tokenizer_config.json"), std::string::npos) << t.status();
  auto t2 = Tokenizer::FromJson(good, R"({"add_bos_token": "yes"})", "/m/tokenizer.json");
  ASSERT_FALSE(t2.ok());
  EXPECT_NE(t2.status().message().find("add_bos_token"), std::string::npos) << t2.status();
}

// Replaces one top-level field of the stories tokenizer.json.
std::string StoriesWith(const std::string& pointer, const json& value) {
  json j = ReadJson(StoriesDir() + "/tokenizer.json");
  j[json::json_pointer(pointer)] = value;
  return j.dump();
}

void ExpectErrorNames(const std::string& tokenizer_json, const std::string& field) {
  auto t = Tokenizer::FromJson(tokenizer_json, "", "/models/m/tokenizer.json");
  ASSERT_FALSE(t.ok()) << "expected an error naming " << field;
  std::string msg(t.status().message());
  EXPECT_NE(msg.find("/models/m/tokenizer.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find(field), std::string::npos) << msg;
}

TEST(TokenizerErrors, UnsupportedComponentsNameTheField) {
  ExpectErrorNames(StoriesWith("/model/type", "WordPiece"), "model.type");
  ExpectErrorNames(StoriesWith("/model/type", "Unigram"), "model.type");
  ExpectErrorNames(StoriesWith("/model/vocab", json::array()), "model.vocab");
  ExpectErrorNames(StoriesWith("/model/merges", json::array({"a b c"})), "model.merges[0]");
  ExpectErrorNames(StoriesWith("/model/merges", json::array({"zz qq"})), "model.merges[0]");
  ExpectErrorNames(StoriesWith("/normalizer/normalizers/1/type", "Precompiled"),
                   "normalizer.normalizers[1].type");
  ExpectErrorNames(StoriesWith("/pre_tokenizer", json{{"type", "BertPreTokenizer"}}),
                   "pre_tokenizer.type");
  ExpectErrorNames(
      StoriesWith(
          "/pre_tokenizer",
          json{{"type", "Sequence"},
               {"pretokenizers", json::array({json{{"type", "Digits"}}, json{{"type", "Nope"}}})}}),
      "pre_tokenizer.pretokenizers[1].type");
  ExpectErrorNames(StoriesWith("/pre_tokenizer", json{{"type", "Split"},
                                                      {"pattern", json{{"Regex", "(unclosed"}}},
                                                      {"behavior", "Isolated"}}),
                   "pre_tokenizer.pattern.Regex");
  ExpectErrorNames(StoriesWith("/decoder/decoders/0/type", "WordPiece"),
                   "decoder.decoders[0].type");
  ExpectErrorNames(StoriesWith("/post_processor/type", "Magic"), "post_processor.type");
  ExpectErrorNames(StoriesWith("/added_tokens/0/id", "zero"), "added_tokens[0].id");
  json no_model = ReadJson(StoriesDir() + "/tokenizer.json");
  no_model.erase("model");
  ExpectErrorNames(no_model.dump(), "model");
}

TEST(TokenizerErrors, MissingDirectory) {
  auto t = Tokenizer::FromDir("/nonexistent/dir");
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("/nonexistent/dir/tokenizer.json"), std::string::npos);
}

// ---------------------------------------------------------------- synthetic components

// A tiny byte-free BPE over single letters; `extra` is merged into the top level.
std::unique_ptr<Tokenizer> Synthetic(const json& extra, const std::string& config = "") {
  json vocab = json::object();
  int id = 0;
  for (const char* tok : {"<s>",
                          "</s>",
                          "a",
                          "b",
                          "c",
                          "ab",
                          "bc",
                          "abc",
                          "ba",
                          "\xE2\x96\x81",
                          "\xE2\x96\x81"
                          "a",
                          "\xE2\x96\x81"
                          "ab",
                          "f",
                          "i",
                          "fi",
                          " ",
                          "x",
                          "1",
                          "2",
                          "12",
                          "xx"}) {
    vocab[tok] = id++;
  }
  json j = {
      {"version", "1.0"},
      {"added_tokens",
       json::array(
           {json{{"id", 0}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
            json{{"id", 1}, {"content", "</s>"}, {"special", true}, {"normalized", false}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer", nullptr},
      {"post_processor", nullptr},
      {"decoder", nullptr},
      {"model",
       {{"type", "BPE"},
        {"vocab", vocab},
        {"merges", json::array({json::array({"a", "b"}), "b c", "ab c", "b a", "\xE2\x96\x81 a",
                                "\xE2\x96\x81"
                                "a b",
                                "f i", "1 2", "\xE2\x96\x81 ab"})},
        {"unk_token", nullptr}}}};
  if (extra.is_object()) j.merge_patch(extra);
  auto t = Tokenizer::FromJson(j.dump(), config, "synthetic/tokenizer.json");
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::move(t).value() : nullptr;
}

std::vector<int32_t> V(std::initializer_list<int32_t> ids) { return ids; }

TEST(SyntheticTokenizer, BpeMergesByRank) {
  auto t = Synthetic({});
  ASSERT_TRUE(t);
  // "abc": a b (rank 0) -> ab, then ab c (rank 2) -> abc.
  EXPECT_EQ(t->Encode("abc", false), V({7}));
  // "bab": b a (rank 3) vs a b (rank 0): a b wins -> b ab.
  EXPECT_EQ(t->Encode("bab", false), V({3, 5}));
  // "bc" then "a": no merge over the left part.
  EXPECT_EQ(t->Encode("bca", false), V({6, 2}));
  EXPECT_EQ(t->Decode(V({3, 5}), false), "b ab");  // no decoder: tokens joined with spaces
  EXPECT_EQ(t->kind(), "sentencepiece-bpe");
  EXPECT_EQ(t->vocab_size(), 21);
  // Unknown characters without unk/byte fallback are dropped, like HF, and the
  // neighbours merge.
  EXPECT_EQ(t->Encode("aZb", false), V({5}));      // a and b become adjacent
  EXPECT_EQ(t->Encode("xx", false), V({16, 16}));  // "xx" is in the vocab but has no merge

  auto unk = Synthetic({{"model", {{"unk_token", "x"}, {"fuse_unk", true}}}});
  EXPECT_EQ(unk->Encode("aZZcb", false), V({2, 16, 4, 3}));
  auto unfused = Synthetic({{"model", {{"unk_token", "x"}, {"fuse_unk", false}}}});
  EXPECT_EQ(unfused->Encode("aZZcb", false), V({2, 16, 16, 4, 3}));
  auto ignore = Synthetic({{"model", {{"ignore_merges", true}}}});
  EXPECT_EQ(ignore->Encode("xx", false), V({20}));
  EXPECT_EQ(ignore->Encode("xxa", false), V({16, 16, 2}));
}

TEST(SyntheticTokenizer, SplitBehaviors) {
  auto with = [](const std::string& behavior, bool invert) {
    return Synthetic({{"pre_tokenizer",
                       {{"type", "Split"},
                        {"pattern", {{"String", "b"}}},
                        {"behavior", behavior},
                        {"invert", invert}}}});
  };
  EXPECT_EQ(with("Removed", false)->Encode("abab", false), V({2, 2}));
  EXPECT_EQ(with("Isolated", false)->Encode("abab", false), V({2, 3, 2, 3}));
  EXPECT_EQ(with("MergedWithPrevious", false)->Encode("abab", false), V({5, 5}));
  EXPECT_EQ(with("MergedWithNext", false)->Encode("abab", false), V({2, 8, 3}));
  EXPECT_EQ(with("Contiguous", false)->Encode("abbab", false), V({2, 3, 3, 2, 3}));
  EXPECT_EQ(with("Removed", true)->Encode("abab", false), V({3, 3}));
  auto regex = Synthetic({{"pre_tokenizer",
                           {{"type", "Split"},
                            {"pattern", {{"Regex", "[0-9]"}}},
                            {"behavior", "Isolated"},
                            {"invert", false}}}});
  EXPECT_EQ(regex->Encode("a12", false), V({2, 17, 18}));
  // Empty regex matches follow the onig crate's find_iter (HF SysRegex): an empty match
  // right after the previous match is skipped. "abab" with b*: (0,0) (1,2) (3,4), so
  // MergedWithNext gives a|ba|b (reporting (2,2) and (4,4) too would give a|b|a|b).
  auto empty_matches = Synthetic({{"pre_tokenizer",
                                   {{"type", "Split"},
                                    {"pattern", {{"Regex", "b*"}}},
                                    {"behavior", "MergedWithNext"},
                                    {"invert", false}}}});
  EXPECT_EQ(empty_matches->Encode("abab", false), V({2, 8, 3}));
  auto digits = Synthetic({{"pre_tokenizer", {{"type", "Digits"}, {"individual_digits", false}}}});
  EXPECT_EQ(digits->Encode("a12", false), V({2, 19}));
  auto individual =
      Synthetic({{"pre_tokenizer", {{"type", "Digits"}, {"individual_digits", true}}}});
  EXPECT_EQ(individual->Encode("a12", false), V({2, 17, 18}));
}

TEST(SyntheticTokenizer, MetaspacePreTokenizerAndDecoder) {
  const std::string ws = "\xE2\x96\x81";
  auto make = [&](const std::string& scheme) {
    return Synthetic({{"pre_tokenizer",
                       {{"type", "Metaspace"},
                        {"replacement", ws},
                        {"prepend_scheme", scheme},
                        {"split", true}}},
                      {"decoder",
                       {{"type", "Metaspace"},
                        {"replacement", ws},
                        {"prepend_scheme", scheme},
                        {"split", true}}}});
  };
  auto first = make("first");
  // "ab ab" -> "▁ab▁ab" -> [▁ab, ▁ab]
  EXPECT_EQ(first->Encode("ab ab", false), V({11, 11}));
  // After an added token the text is not at the start: no "▁" with "first".
  EXPECT_EQ(first->Encode("<s>ab", false), V({0, 5}));
  EXPECT_EQ(make("always")->Encode("<s>ab", false), V({0, 11}));
  EXPECT_EQ(make("never")->Encode("ab", false), V({5}));
  EXPECT_EQ(first->Decode(V({11, 11}), false), "ab ab");
  EXPECT_EQ(make("never")->Decode(V({11, 11}), false), " ab ab");
}

TEST(SyntheticTokenizer, NormalizersAndAddedTokenStripping) {
  auto nfkc = Synthetic({{"normalizer", {{"type", "NFKC"}}}});
  EXPECT_EQ(nfkc->Encode("\xEF\xAC\x81", false), V({14}));  // U+FB01 "ﬁ" -> "fi"
  auto lower = Synthetic({{"normalizer", {{"type", "Lowercase"}}}});
  EXPECT_EQ(lower->Encode("ABC", false), V({7}));

  json added = json::array({json{{"id", 0},
                                 {"content", "<s>"},
                                 {"special", true},
                                 {"normalized", false},
                                 {"lstrip", true},
                                 {"rstrip", true}},
                            json{{"id", 1},
                                 {"content", "</s>"},
                                 {"special", true},
                                 {"normalized", false},
                                 {"single_word", true}}});
  auto strip = Synthetic({{"added_tokens", added}});
  // lstrip/rstrip swallow the spaces around "<s>".
  EXPECT_EQ(strip->Encode("a  <s>  b", false), V({2, 0, 3}));
  // single_word: "</s>" glued to a word is not the added token.
  EXPECT_EQ(strip->Encode("a </s> b", false), V({2, 15, 1, 15, 3}));
  std::vector<int32_t> glued = strip->Encode("a</s>", false);
  EXPECT_EQ(std::count(glued.begin(), glued.end(), 1), 0);
}

TEST(SyntheticTokenizer, MoreNormalizersAndPreTokenizers) {
  auto ws_split = Synthetic({{"pre_tokenizer", {{"type", "WhitespaceSplit"}}}});
  EXPECT_EQ(ws_split->Encode("ab \t ab", false), V({5, 5}));
  auto ws = Synthetic({{"pre_tokenizer", {{"type", "Whitespace"}}}});
  EXPECT_EQ(ws->Encode("ab,c a", false), V({5, 4, 2}));  // "," is not in the vocab
  // Rust's \w includes marks: "a\u0301b" is one word (the unknown mark is dropped and
  // a+b merge); splitting at the mark would give a, b.
  EXPECT_EQ(ws->Encode("a\xCC\x81"
                       "b",
                       false),
            V({5}));
  auto punct = Synthetic({{"pre_tokenizer", {{"type", "Punctuation"}, {"behavior", "Removed"}}}});
  EXPECT_EQ(punct->Encode("a!b", false), V({2, 3}));  // split apart: no "ab" merge
  auto strip =
      Synthetic({{"normalizer", {{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}}});
  EXPECT_EQ(strip->Encode(" \u3000abc\n ", false), V({7}));
  auto accents = Synthetic(
      {{"normalizer",
        {{"type", "Sequence"},
         {"normalizers", json::array({json{{"type", "NFD"}}, json{{"type", "StripAccents"}}})}}}});
  EXPECT_EQ(accents->Encode("\xC3\xA1"
                            "b",
                            false),
            V({5}));  // "áb" -> "ab"
  auto replace =
      Synthetic({{"normalizer",
                  {{"type", "Replace"}, {"pattern", {{"Regex", "[0-9]+"}}}, {"content", "x"}}}});
  EXPECT_EQ(replace->Encode("a12b", false), V({2, 16, 3}));
  auto prepend = Synthetic({{"normalizer", {{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}}}});
  EXPECT_EQ(prepend->Encode("ab", false), V({11}));
  EXPECT_EQ(prepend->Encode("", false), V({}));
}

TEST(SyntheticTokenizer, TemplateAndConfigOverrides) {
  json post = {{"type", "TemplateProcessing"},
               {"single", json::array({json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                       json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                       json{{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
               {"special_tokens",
                {{"<s>", {{"id", "<s>"}, {"ids", {0}}, {"tokens", {"<s>"}}}},
                 {"</s>", {{"id", "</s>"}, {"ids", {1}}, {"tokens", {"</s>"}}}}}}};
  auto t = Synthetic({{"post_processor", post}});
  EXPECT_EQ(t->Encode("ab", true), V({0, 5, 1}));
  EXPECT_EQ(t->Encode("ab", false), V({5}));
  EXPECT_EQ(t->bos_id(), 0);
  EXPECT_EQ(t->eos_id(), 1);
  EXPECT_EQ(t->Decode(V({0, 5, 1}), true), "ab");

  auto no_eos = Synthetic({{"post_processor", post}}, R"({"add_eos_token": false})");
  EXPECT_EQ(no_eos->Encode("ab", true), V({0, 5}));
  auto no_bos = Synthetic({{"post_processor", post}},
                          R"({"add_bos_token": false, "bos_token": {"content": "<s>"}})");
  EXPECT_EQ(no_bos->Encode("ab", true), V({5, 1}));
  EXPECT_EQ(no_bos->bos_id(), 0);
  auto both = Synthetic({}, R"({"add_bos_token": true, "add_eos_token": true,
                               "bos_token": "<s>", "eos_token": "</s>"})");
  EXPECT_EQ(both->Encode("ab", true), V({0, 5, 1}));
}

TEST(TokenizerRegex, OnigurumaEscapesAreRewritten) {
  using tok::OnigToPcre2;
  EXPECT_EQ(OnigToPcre2(R"(\s+(?!\S))"), R"(\p{White_Space}+(?!\P{White_Space}))");
  EXPECT_EQ(OnigToPcre2(R"([^\s\p{L}\p{N}]+)"), R"([^\p{White_Space}\p{L}\p{N}]+)");
  const std::string word = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc})";
  const std::string latin1 = R"(\x{B2}\x{B3}\x{B9}\x{BC}-\x{BE})";
  EXPECT_EQ(OnigToPcre2(R"(\w+|[^\w\s]+)"),
            "[" + word + latin1 + "]+|[^" + word + R"(\p{White_Space}]+)");
  EXPECT_EQ(OnigToPcre2(R"(\W\h\H)"), "[^" + word + latin1 + R"(][0-9a-fA-F][^0-9a-fA-F])");
  // Escaped backslashes, \Q...\E, a leading ']' and POSIX classes are left alone.
  EXPECT_EQ(OnigToPcre2(R"(\\s\Q\s\E[]\s][[:alpha:]\s])"),
            R"(\\s\Q\s\E[]\p{White_Space}][[:alpha:]\p{White_Space}])");
  EXPECT_EQ(OnigToPcre2(R"('s|'t| ?\p{L}+| ?\p{N}+|\x{2581})"),
            R"('s|'t| ?\p{L}+| ?\p{N}+|\x{2581})");

  auto spans = [](const std::string& pattern, const std::string& text) {
    auto re = tok::Regex::Compile(pattern);
    EXPECT_TRUE(re.ok()) << re.status();
    std::vector<std::pair<size_t, size_t>> out;
    if (re.ok()) (*re)->FindAll(text, &out);
    return out;
  };
  using Spans = std::vector<std::pair<size_t, size_t>>;
  // U+180E (3 bytes) is not whitespace for Oniguruma (PCRE2's \s matches it).
  EXPECT_EQ(spans(R"(\s+)", "a\xE1\xA0\x8E b"), Spans({{4, 5}}));
  // A combining mark (U+0301, 2 bytes) is part of an Oniguruma \w run.
  EXPECT_EQ(spans(R"(\w+)", "e\xCC\x81t x"), Spans({{0, 4}, {5, 6}}));
  EXPECT_EQ(spans(R"(\h+)", "zz0fA9g"), Spans({{2, 6}}));
  // Measured through HF: Oniguruma's \w has Alphabetic (Ⅻ, Ⓐ) but not other numbers
  // (①), and ² only outside a class.
  EXPECT_EQ(spans(R"(\w)", "\xE2\x85\xAB \xE2\x92\xB6 \xE2\x91\xA0 \xC2\xB2"),
            Spans({{0, 3}, {4, 7}, {12, 14}}));
  EXPECT_EQ(spans(R"([\w])", "\xE2\x85\xAB \xE2\x92\xB6 \xE2\x91\xA0 \xC2\xB2"),
            Spans({{0, 3}, {4, 7}}));
}

TEST(SyntheticTokenizer, NormalizedAddedTokenDecodesFromItsNormalizedForm) {
  // HF 0.23 keeps the normalizer's output for a `normalized` added token whose content
  // it changes and hands that to the decoder (and id_to_token); token_to_id still takes
  // the content.
  json added = json::array({json{{"id", 0}, {"content", "<s>"}, {"special", true}},
                            json{{"id", 1}, {"content", "</s>"}, {"special", true}},
                            json{{"id", 21}, {"content", " ab"}, {"normalized", true}}});
  auto t = Synthetic(
      {{"added_tokens", added},
       {"normalizer",
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}});
  ASSERT_TRUE(t);
  EXPECT_EQ(t->Encode("c ab", false), V({4, 21}));
  EXPECT_EQ(t->IdToToken(21),
            "\xE2\x96\x81"
            "ab");
  EXPECT_EQ(t->TokenToId(" ab"), 21);
  EXPECT_EQ(t->Decode(V({4, 21}), false),
            "c \xE2\x96\x81"
            "ab");  // no decoder: joined by spaces
}

TEST(SyntheticTokenizer, StripAccentsRemovesAllCombiningMarks) {
  // unicode-normalization's is_combining_mark: Mn, Mc and Me (U+093F is Mc). A mark that
  // survived would be its own piece (Split on \p{M}) and keep "a" and "b" apart.
  const json split_marks = {
      {"type", "Split"}, {"pattern", {{"Regex", "\\p{M}"}}}, {"behavior", "Isolated"}};
  const json strip = {
      {"type", "Sequence"},
      {"normalizers", json::array({json{{"type", "NFD"}}, json{{"type", "StripAccents"}}})}};
  auto accents = Synthetic({{"normalizer", strip}, {"pre_tokenizer", split_marks}});
  EXPECT_EQ(accents->Encode("a\xE0\xA4\xBF"
                            "b",
                            false),
            V({5}));
  EXPECT_EQ(accents->Encode("a\xCC\x81"
                            "b",
                            false),
            V({5}));  // Mn too
  auto keep = Synthetic({{"pre_tokenizer", split_marks}});
  EXPECT_EQ(keep->Encode("a\xE0\xA4\xBF"
                         "b",
                         false),
            V({2, 3}));
}

TEST(TokenizerRegex, RustWordCharForSingleWord) {
  // HF's single_word check uses the Rust regex crate's \w.
  EXPECT_TRUE(tok::IsWordChar('a'));
  EXPECT_TRUE(tok::IsWordChar('_'));
  EXPECT_FALSE(tok::IsWordChar('-'));
  EXPECT_TRUE(tok::IsWordChar(0x24B6));   // Ⓐ: So but Other_Alphabetic
  EXPECT_TRUE(tok::IsWordChar(0x216B));   // Ⅻ: Nl
  EXPECT_TRUE(tok::IsWordChar(0x0301));   // combining acute
  EXPECT_TRUE(tok::IsWordChar(0x200D));   // ZWJ (Join_Control)
  EXPECT_TRUE(tok::IsWordChar(0x0663));   // Arabic-Indic 3 (Nd)
  EXPECT_FALSE(tok::IsWordChar(0x2460));  // ①: No
  EXPECT_FALSE(tok::IsWordChar(0x00B2));  // ²: No
}

TEST(SyntheticTokenizer, ByteFallbackDecoderTokenParsing) {
  // HF parses "<0xHH>" with u8::from_str_radix(&token[3..5], 16), which also accepts
  // "+H"; other 6-byte look-alikes are ordinary tokens.
  auto t = Synthetic({{"model", {{"vocab", {{"<0x+A>", 21}, {"<0x41>", 22}, {"<0xZZ>", 23}}}}},
                      {"decoder", {{"type", "ByteFallback"}}}});
  ASSERT_TRUE(t);
  EXPECT_EQ(t->Decode(V({21, 22}), false), "\nA");
  EXPECT_EQ(t->Decode(V({22, 23, 2}), false), "A<0xZZ>a");
}

TEST(SyntheticTokenizer, EosFallbackNames) {
  // No tokenizer_config and no template suffix: eos is the first known common name.
  json added = json::array({json{{"id", 0}, {"content", "<s>"}, {"special", true}},
                            json{{"id", 1}, {"content", "<|im_end|>"}, {"special", true}}});
  auto t = Synthetic(
      {{"model", {{"vocab", {{"</s>", nullptr}, {"<|im_end|>", 1}}}}}, {"added_tokens", added}});
  ASSERT_TRUE(t);
  EXPECT_EQ(t->eos_id(), 1);
  EXPECT_EQ(t->bos_id(), std::nullopt);
  EXPECT_EQ(t->IdToToken(1), "<|im_end|>");
  auto with_config = Synthetic({}, R"({"eos_token": "<s>"})");
  EXPECT_EQ(with_config->eos_id(), 0);
}

}  // namespace
}  // namespace superpose::engine
