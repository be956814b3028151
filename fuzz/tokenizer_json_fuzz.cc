// libFuzzer target: tokenizer.json itself (Tokenizer::FromJson), the parser of the
// tokenizer half of a model directory: model (BPE vocab and merges), normalizers,
// pre-tokenizers (Oniguruma regexes run on PCRE2), decoders, post-processor, added tokens.
// Invariants: a rejected file is INVALID_ARGUMENT naming the file; an accepted one
// encodes a few fixed texts to ids in [0, vocab_size) and decodes any ids to valid UTF-8.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "engine/model/tokenizer.h"
#include "fuzz/fuzz_util.h"

namespace superpose::fuzz {
namespace {

const std::string kSource = "/fuzz/tokenizer.json";

void Exercise(const engine::Tokenizer& t) {
  static const char* const kTexts[] = {"", "Hello world", " a  b\n",
                                       "caf\xC3\xA9 123 \xF0\x9F\x98\x80", "<s>x</s>"};
  const int32_t vocab = t.vocab_size();
  FUZZ_CHECK(vocab >= 0);
  std::vector<int32_t> all;
  for (const char* text : kTexts) {
    for (bool special : {false, true}) {
      for (int32_t id : t.Encode(text, special)) {
        FUZZ_CHECK(id >= 0 && id < vocab);
        all.push_back(id);
      }
    }
  }
  for (int32_t id = -1; id <= 300 && id <= vocab; ++id) all.push_back(id);
  for (bool skip : {false, true}) FUZZ_CHECK(StrictUtf8(t.Decode(all, skip)));
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace superpose::fuzz;
  if (size > 64 * 1024) return 0;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto t = superpose::engine::Tokenizer::FromJson(text, "", kSource);
  if (!t.ok()) {
    FUZZ_CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(std::string(t.status().message()).rfind(kSource, 0) == 0);
    return 0;
  }
  Exercise(**t);
  return 0;
}
