// libFuzzer target: the real tokenizers of the fixtures (loaded once) on arbitrary input.
// Byte 0 picks the tokenizer and the mode; the rest is the payload.
//   text mode: payload -> Encode -> Decode, with the round trip each tokenizer promises:
//     byte-level BPE without a normalizer (GPT-2, Falcon): exactly the text;
//     byte-level BPE with NFC (GPT-NeoX): the text in NFC;
//       both only when every byte of the text has a vocabulary entry: Falcon's vocab
//       lacks 28 of the 256 byte symbols (e.g. 0x0B, 0xF2), and BPE without an
//       unk_token drops such a symbol (as HF tokenizers does);
//     SentencePiece-style BPE (Prepend("▁") + Replace(" "->"▁") normalizer, byte
//       fallback, Strip decoder): exactly the text when it holds no "▁" (which decodes to
//       a space) and no added-token content (a special token is followed by a
//       Prepend-ed "▁" that decodes to a space); always valid UTF-8.
//     Plus, for every tokenizer: ids in [0, vocab_size) with a token string,
//     Encode(text, true) is Encode(text, false) framed by the post-processor's ids,
//     invalid UTF-8 encodes like its lossy conversion, and a DecodeStream over the ids
//     emits exactly Decode(ids).
//   ids mode: the payload as a list of ids (some out of range, some negative): Decode and
//     DecodeStream must return valid UTF-8 and not crash.
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/tokenizer.h"
#include "engine/model/tokenizer_unicode.h"
#include "fuzz/fuzz_util.h"

namespace superpose::fuzz {
namespace {

using engine::Tokenizer;

enum class RoundTrip { kExact, kNfc, kSentencePiece };

struct Loaded {
  std::string name;
  RoundTrip round_trip;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<std::string> added_contents;  // from tokenizer.json's added_tokens
  std::vector<int32_t> framing;             // Encode("", true)
  std::array<bool, 256> byte_in_vocab{};    // byte-level: the byte's symbol is a token
};

std::vector<Loaded>* g_tokenizers = nullptr;

Loaded Load(const std::string& name, const std::string& dir, RoundTrip rt) {
  Loaded l{name, rt, nullptr, {}, {}};
  auto t = Tokenizer::FromDir(dir);
  if (!t.ok()) {
    std::fprintf(stderr, "fuzz: %s: %s\n", dir.c_str(), t.status().ToString().c_str());
    std::exit(2);
  }
  l.tokenizer = std::move(*t);
  const auto j = nlohmann::json::parse(ReadFileOrDie(dir + "/tokenizer.json"));
  for (const auto& a : j.at("added_tokens")) {
    l.added_contents.push_back(a.at("content").get<std::string>());
  }
  l.framing = l.tokenizer->Encode("", true);
  for (int b = 0; b < 256; ++b) {
    l.byte_in_vocab[b] =
        l.tokenizer->TokenToId(engine::tok::ByteToUnicode(static_cast<uint8_t>(b))).has_value();
  }
  return l;
}

bool Contains(const std::string& s, std::string_view p) { return s.find(p) != std::string::npos; }

void CheckIds(const Loaded& l, const std::vector<int32_t>& ids) {
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < l.tokenizer->vocab_size());
    FUZZ_CHECK(!l.tokenizer->IdToToken(id).empty());
  }
}

// Encode(text, true) == prefix + Encode(text, false) + suffix, prefix + suffix = framing.
void CheckFraming(const Loaded& l, const std::vector<int32_t>& plain,
                  const std::vector<int32_t>& with_special) {
  FUZZ_CHECK(with_special.size() == plain.size() + l.framing.size());
  bool found = false;
  for (size_t k = 0; k <= l.framing.size() && !found; ++k) {
    std::vector<int32_t> rebuilt(l.framing.begin(), l.framing.begin() + k);
    rebuilt.insert(rebuilt.end(), plain.begin(), plain.end());
    rebuilt.insert(rebuilt.end(), l.framing.begin() + k, l.framing.end());
    found = rebuilt == with_special;
  }
  FUZZ_CHECK(found);
}

// Streams `ids` after `prompt`; returns the concatenated pieces, each valid UTF-8.
std::string Stream(const Tokenizer& t, const std::vector<int32_t>& prompt,
                   const std::vector<int32_t>& ids, bool skip_special) {
  engine::DecodeStream stream(&t, prompt, skip_special);
  std::string all;
  for (int32_t id : ids) {
    std::string piece = stream.Step(id);
    FUZZ_CHECK(StrictUtf8(piece));
    all += piece;
  }
  std::string rest = stream.Flush();
  FUZZ_CHECK(StrictUtf8(rest));
  return all + rest;
}

bool RoundTripApplies(const Loaded& l, const std::string& text) {
  if (l.round_trip != RoundTrip::kSentencePiece) {
    for (char c : text) {
      if (!l.byte_in_vocab[static_cast<uint8_t>(c)]) return false;
    }
    return true;
  }
  if (Contains(text, "\xE2\x96\x81")) return false;  // U+2581 "▁"
  for (const std::string& c : l.added_contents) {
    if (Contains(text, c)) return false;
  }
  return true;
}

void FuzzText(const Loaded& l, const std::string& text) {
  const Tokenizer& t = *l.tokenizer;
  const std::vector<int32_t> ids = t.Encode(text, false);
  CheckIds(l, ids);
  CheckFraming(l, ids, t.Encode(text, true));
  if (!StrictUtf8(text)) {
    // Documented: invalid UTF-8 is first converted like String::from_utf8_lossy.
    FUZZ_CHECK(ids == t.Encode(engine::tok::Utf8Lossy(text), false));
    return;
  }
  const std::string decoded = t.Decode(ids, false);
  FUZZ_CHECK(StrictUtf8(decoded));
  FUZZ_CHECK(StrictUtf8(t.Decode(ids, true)));
  if (RoundTripApplies(l, text)) {
    const std::string want =
        l.round_trip == RoundTrip::kNfc
            ? engine::tok::UnicodeNormalize(text, engine::tok::NormalForm::kNFC)
            : text;
    FUZZ_CHECK(decoded == want);
  }
  // Streaming the ids from scratch gives exactly Decode(ids).
  FUZZ_CHECK(Stream(t, {}, ids, false) == decoded);
}

void FuzzIds(const Loaded& l, const uint8_t* data, size_t size) {
  const Tokenizer& t = *l.tokenizer;
  // Two bytes per id, spread over [-4, vocab_size + 4).
  const uint32_t span = static_cast<uint32_t>(t.vocab_size()) + 8;
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < size; i += 2) {
    const uint32_t v = data[i] | (static_cast<uint32_t>(data[i + 1]) << 8);
    ids.push_back(static_cast<int32_t>(v % span) - 4);
  }
  for (bool skip : {false, true}) {
    FUZZ_CHECK(StrictUtf8(t.Decode(ids, skip)));
    // A prompt of the first third, the rest streamed.
    const size_t k = ids.size() / 3;
    std::vector<int32_t> prompt(ids.begin(), ids.begin() + k), gen(ids.begin() + k, ids.end());
    FUZZ_CHECK(StrictUtf8(Stream(t, prompt, gen, skip)));
  }
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using superpose::fuzz::Load;
  using superpose::fuzz::RoundTrip;
  const std::string f = superpose::fuzz::SharedDir() + "/fixtures";
  auto* v = new std::vector<superpose::fuzz::Loaded>();
  v->push_back(Load("stories260k", f + "/stories260k", RoundTrip::kSentencePiece));
  v->push_back(Load("llama-spm", f + "/tokenizers/llama-spm", RoundTrip::kSentencePiece));
  v->push_back(Load("phi-3", f + "/tokenizers/phi-3", RoundTrip::kSentencePiece));
  v->push_back(Load("gpt-2", f + "/tokenizers/gpt-2", RoundTrip::kExact));
  v->push_back(Load("gpt-neox", f + "/tokenizers/gpt-neox", RoundTrip::kNfc));
  v->push_back(Load("falcon", f + "/tokenizers/falcon", RoundTrip::kExact));
  superpose::fuzz::g_tokenizers = v;
  return 0;
}

// Byte 0: tokenizer = b % 6, mode = (b / 6) % 2 (0 text, 1 ids). See fuzz/make_seeds.py.
extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 || size > 4096) return 0;
  const auto& all = *superpose::fuzz::g_tokenizers;
  const auto& l = all[data[0] % all.size()];
  if ((data[0] / all.size()) % 2 == 0) {
    superpose::fuzz::FuzzText(l, std::string(reinterpret_cast<const char*>(data + 1), size - 1));
  } else {
    superpose::fuzz::FuzzIds(l, data + 1, size - 1);
  }
  return 0;
}
