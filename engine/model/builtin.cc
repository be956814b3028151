#include "engine/model/builtin.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/util/status.h"

namespace superpose::engine {
namespace {

// ---------------------------------------------------------------------------------------
// Tokenizer.

// English text the built-in tokenizer's merges are learned from (written for this file).
constexpr const char kCorpus[] =
    "The sun came up over the hills and the town began to wake. In the kitchen, the "
    "kettle was singing on the stove, and the smell of bread filled the house. A small "
    "girl sat at the table with her brother. They were talking about the day ahead: "
    "there was a market in the square, and their mother had said that they could go "
    "if they finished their work first.\n"
    "When the dishes were washed and the floor was swept, the children put on their "
    "coats and walked down the road. The air was cold but the sky was clear. People "
    "were setting up their stalls, and there were apples, cheese, flowers, baskets and "
    "old books on every side. The girl wanted to see everything at once. Her brother "
    "was looking for something special for their mother, because it was her birthday.\n"
    "They stopped at a stall where an old man was selling wooden boxes. Each box had "
    "a different pattern carved into the lid: a bird, a tree, a ship on the sea. The "
    "children looked at them for a long time. \"This one,\" said the girl, and she "
    "pointed to the box with the bird. Her brother counted the coins in his pocket. "
    "It was just enough.\n"
    "On the way home they talked about how they would give the present. They decided "
    "to hide it under the table and wait until after dinner. That evening, when their "
    "mother opened the box, she smiled and held it in her hands for a while. She said "
    "that it was the most beautiful thing she had ever been given, and that she would "
    "keep her letters in it.\n"
    "Later, when the house was quiet, the girl thought about the market and the old "
    "man and the carved bird. She wondered who had made the boxes and where the wood "
    "had come from. She decided that one day she would learn to carve wood too, and "
    "that she would make a box for her brother with a ship on the lid.\n"
    "Computers and servers work in a similar way: a request comes in, the model reads "
    "the tokens, and then it writes new tokens one at a time until it is finished. "
    "Each step takes the previous text into account. This is only a small example, "
    "and the model that is built into this program has never been trained, so the "
    "words that it writes are not meaningful. It is here so that the server can start "
    "and answer requests on a fresh machine without downloading anything.\n";

// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the others are
// U+0100 upwards in byte order. Returns the UTF-8 spelling of each byte.
std::vector<std::string> ByteAlphabet() {
  std::vector<bool> printable(256, false);
  for (int b = '!'; b <= '~'; ++b) printable[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
  std::vector<std::string> out(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const int cp = printable[b] ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    out[b] = s;
  }
  return out;
}

bool IsLetter(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(unsigned char c) { return c >= '0' && c <= '9'; }
bool IsSpace(unsigned char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// The GPT-2 pre-tokenizer regex, for ASCII text:
// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::string> PreTokenize(const std::string& text) {
  std::vector<std::string> out;
  const size_t n = text.size();
  size_t i = 0;
  auto run = [&](size_t start, size_t j, bool (*pred)(unsigned char)) {
    while (j < n && pred(static_cast<unsigned char>(text[j]))) ++j;
    out.push_back(text.substr(start, j - start));
    return j;
  };
  auto other = [](unsigned char c) { return !IsSpace(c) && !IsLetter(c) && !IsDigit(c); };
  while (i < n) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\'') {
      bool matched = false;
      for (const char* s : {"s", "t", "re", "ve", "m", "ll", "d"}) {
        const size_t len = std::strlen(s);
        if (text.compare(i + 1, len, s) == 0) {
          out.push_back(text.substr(i, len + 1));
          i += len + 1;
          matched = true;
          break;
        }
      }
      if (matched) continue;
    }
    size_t j = i;
    if (c == ' ' && i + 1 < n && !IsSpace(static_cast<unsigned char>(text[i + 1]))) j = i + 1;
    const unsigned char d = static_cast<unsigned char>(text[j]);
    if (IsLetter(d)) {
      i = run(i, j, IsLetter);
    } else if (IsDigit(d)) {
      i = run(i, j, IsDigit);
    } else if (other(d)) {
      i = run(i, j, +other);
    } else {
      // Whitespace run; if followed by a non-space, leave the last space for it.
      size_t k = i;
      while (k < n && IsSpace(static_cast<unsigned char>(text[k]))) ++k;
      if (k < n && k - i > 1) --k;
      out.push_back(text.substr(i, k - i));
      i = k;
    }
  }
  return out;
}

struct ByteLevelVocab {
  std::vector<std::string> tokens;  // id -> token string (byte-level alphabet)
  std::vector<std::pair<int32_t, int32_t>> merges;
};

// Learns merges by BPE (most frequent pair first; ties broken by the smaller pair of
// ids) from kCorpus.
ByteLevelVocab BuildByteLevelVocab(int32_t vocab_size_limit) {
  ByteLevelVocab v;
  const std::vector<std::string> alpha = ByteAlphabet();
  v.tokens = alpha;
  v.tokens.push_back("<s>");
  v.tokens.push_back("</s>");
  std::map<std::string, int32_t> word_count;
  for (const std::string& w : PreTokenize(kCorpus)) ++word_count[w];
  std::vector<std::pair<std::vector<int32_t>, int32_t>> words;
  for (const auto& [w, count] : word_count) {
    std::vector<int32_t> ids;
    for (unsigned char c : w) ids.push_back(c);
    words.emplace_back(std::move(ids), count);
  }
  std::set<std::string> known(v.tokens.begin(), v.tokens.end());
  std::set<std::pair<int32_t, int32_t>> banned;  // would duplicate an existing token
  while (static_cast<int32_t>(v.tokens.size()) < vocab_size_limit) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (const auto& [ids, count] : words) {
      for (size_t k = 0; k + 1 < ids.size(); ++k) pairs[{ids[k], ids[k + 1]}] += count;
    }
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_count = 1;
    for (const auto& [p, count] : pairs) {  // ascending pair order: first max wins
      if (count > best_count && banned.count(p) == 0) {
        best = p;
        best_count = count;
      }
    }
    if (best.first < 0) break;  // no pair occurs twice
    const std::string merged = v.tokens[best.first] + v.tokens[best.second];
    if (known.count(merged) != 0) {
      banned.insert(best);
      continue;
    }
    const int32_t id = static_cast<int32_t>(v.tokens.size());
    v.tokens.push_back(merged);
    known.insert(merged);
    v.merges.push_back(best);
    for (auto& [ids, count] : words) {
      std::vector<int32_t> next;
      next.reserve(ids.size());
      for (size_t k = 0; k < ids.size(); ++k) {
        if (k + 1 < ids.size() && ids[k] == best.first && ids[k + 1] == best.second) {
          next.push_back(id);
          ++k;
        } else {
          next.push_back(ids[k]);
        }
      }
      ids = std::move(next);
    }
  }
  return v;
}

const ByteLevelVocab& CachedVocab(int32_t vocab_size_limit) {
  // The built-in size is asked for repeatedly; other sizes are rare.
  static const ByteLevelVocab* builtin =
      new ByteLevelVocab(BuildByteLevelVocab(kBuiltinVocabLimit));
  if (vocab_size_limit == kBuiltinVocabLimit) return *builtin;
  thread_local ByteLevelVocab other;
  other = BuildByteLevelVocab(vocab_size_limit);
  return other;
}

// ---------------------------------------------------------------------------------------
// Deterministic random weights.

inline uint64_t Mix64(uint64_t z) {  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t TensorSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001B3ull;
  return Mix64(seed ^ Mix64(h));
}

// Element i of a tensor: the sum of the four 16-bit parts of a counter-based hash
// (Irwin-Hall, bounded at 3.46 sigma), scaled to standard deviation `stddev`. Counter-
// based, so any chunk can be produced independently; one float rounding per value.
void RandomFill(uint64_t tensor_seed, int64_t offset, int64_t count, float stddev, float* out) {
  // Sum of 4 uniform {0..65535}: mean 131070, standard deviation ~65536/sqrt(3).
  const float scale = static_cast<float>(stddev * std::sqrt(3.0) / 65536.0);
  for (int64_t i = 0; i < count; ++i) {
    const uint64_t r =
        Mix64(tensor_seed + static_cast<uint64_t>(offset + i) * 0x9E3779B97F4A7C15ull);
    const int32_t s = static_cast<int32_t>((r & 0xFFFF) + ((r >> 16) & 0xFFFF) +
                                           ((r >> 32) & 0xFFFF) + (r >> 48)) -
                      131070;
    out[i] = static_cast<float>(s) * scale;
  }
}

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  float stddev;  // 0: all ones (norm weights); < 0: random signs (+-1)
};

struct Scales {
  float embed, q, k, v, o, gate, up, down, bias;
  float final_norm = 0.0f;  // as TensorPlan::stddev
};

std::vector<TensorPlan> PlanTensors(const ModelConfig& c, const Scales& s) {
  std::vector<TensorPlan> t;
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int64_t Q = static_cast<int64_t>(c.num_heads) * D;
  const int64_t KV = static_cast<int64_t>(c.num_kv_heads) * D;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, s.embed});
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t.push_back({p + "input_layernorm.weight", {H}, 0.0f});
    t.push_back({p + "self_attn.q_proj.weight", {Q, H}, s.q});
    t.push_back({p + "self_attn.k_proj.weight", {KV, H}, s.k});
    t.push_back({p + "self_attn.v_proj.weight", {KV, H}, s.v});
    if (c.attention_bias) {
      t.push_back({p + "self_attn.q_proj.bias", {Q}, s.bias});
      t.push_back({p + "self_attn.k_proj.bias", {KV}, s.bias});
      t.push_back({p + "self_attn.v_proj.bias", {KV}, s.bias});
    }
    if (c.qk_norm) {
      t.push_back({p + "self_attn.q_norm.weight", {D}, 0.0f});
      t.push_back({p + "self_attn.k_norm.weight", {D}, 0.0f});
    }
    t.push_back({p + "self_attn.o_proj.weight", {H, Q}, s.o});
    t.push_back({p + "post_attention_layernorm.weight", {H}, 0.0f});
    t.push_back({p + "mlp.gate_proj.weight", {I, H}, s.gate});
    t.push_back({p + "mlp.up_proj.weight", {I, H}, s.up});
    t.push_back({p + "mlp.down_proj.weight", {H, I}, s.down});
  }
  t.push_back({"model.norm.weight", {H}, s.final_norm});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, H}, s.embed});
  return t;
}

void FillTensor(const TensorPlan& p, uint64_t seed, int64_t offset, int64_t count, float* out) {
  if (p.stddev == 0.0f) {
    std::fill(out, out + count, 1.0f);
  } else if (p.stddev < 0.0f) {
    const uint64_t ts = TensorSeed(seed, p.name);
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t r = Mix64(ts + static_cast<uint64_t>(offset + i) * 0x9E3779B97F4A7C15ull);
      out[i] = (r >> 63) != 0 ? -1.0f : 1.0f;
    }
  } else {
    RandomFill(TensorSeed(seed, p.name), offset, count, p.stddev, out);
  }
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create"));
  out << text;
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace

int32_t ByteLevelTokenizerSize(int32_t vocab_size_limit) {
  return static_cast<int32_t>(CachedVocab(vocab_size_limit).tokens.size());
}

std::string ByteLevelTokenizerJson(int32_t vocab_size_limit) {
  using ojson = nlohmann::ordered_json;
  const ByteLevelVocab& v = CachedVocab(vocab_size_limit);
  ojson vocab = ojson::object();
  for (size_t id = 0; id < v.tokens.size(); ++id) vocab[v.tokens[id]] = id;
  ojson merges = ojson::array();
  for (const auto& [a, b] : v.merges) merges.push_back(v.tokens[a] + " " + v.tokens[b]);
  auto added = [](int32_t id, const char* content) {
    ojson t;
    t["id"] = id;
    t["content"] = content;
    t["single_word"] = false;
    t["lstrip"] = false;
    t["rstrip"] = false;
    t["normalized"] = false;
    t["special"] = true;
    return t;
  };
  auto special = [](int type_id) {
    ojson s;
    s["SpecialToken"] = {{"id", "<s>"}, {"type_id", type_id}};
    return s;
  };
  auto sequence = [](const char* id, int type_id) {
    ojson s;
    s["Sequence"] = {{"id", id}, {"type_id", type_id}};
    return s;
  };
  ojson tok;
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = ojson::array({added(256, "<s>"), added(257, "</s>")});
  tok["normalizer"] = nullptr;
  ojson pre;
  pre["type"] = "ByteLevel";
  pre["add_prefix_space"] = false;
  pre["trim_offsets"] = true;
  pre["use_regex"] = true;
  tok["pre_tokenizer"] = pre;
  ojson post;
  post["type"] = "TemplateProcessing";
  post["single"] = ojson::array({special(0), sequence("A", 0)});
  post["pair"] = ojson::array({special(0), sequence("A", 0), special(1), sequence("B", 1)});
  ojson bos;
  bos["id"] = "<s>";
  bos["ids"] = {256};
  bos["tokens"] = {"<s>"};
  post["special_tokens"] = {{"<s>", bos}};
  tok["post_processor"] = post;
  ojson dec;
  dec["type"] = "ByteLevel";
  dec["add_prefix_space"] = true;
  dec["trim_offsets"] = true;
  dec["use_regex"] = true;
  tok["decoder"] = dec;
  ojson model;
  model["type"] = "BPE";
  model["dropout"] = nullptr;
  model["unk_token"] = nullptr;
  model["continuing_subword_prefix"] = nullptr;
  model["end_of_word_suffix"] = nullptr;
  model["fuse_unk"] = false;
  model["byte_fallback"] = false;
  model["ignore_merges"] = false;
  model["vocab"] = vocab;
  model["merges"] = merges;
  tok["model"] = model;
  return tok.dump(1) + "\n";
}

ModelConfig LlamaShapedConfig(int32_t hidden, int32_t layers, int32_t heads, int32_t kv_heads,
                              int32_t intermediate, int32_t vocab) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = heads > 0 ? hidden / heads : 0;
  c.vocab_size = vocab;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0f;
  c.tie_word_embeddings = false;
  c.dtype = DType::kBF16;
  c.bos_token_id = 256;
  c.eos_token_ids = {257};
  return c;
}

BuiltinModel MakeBuiltinModel() {
  BuiltinModel m;
  m.tokenizer_json = ByteLevelTokenizerJson(kBuiltinVocabLimit);
  m.config = LlamaShapedConfig(128, 4, 4, 2, 352, ByteLevelTokenizerSize(kBuiltinVocabLimit));
  m.config.tie_word_embeddings = true;
  m.config.max_position_embeddings = 2048;
  m.config.dtype = DType::kF32;
  m.weights = std::make_unique<InMemoryWeights>();
  // Scales chosen so that the layers, not the token's own embedding, dominate the
  // residual stream (with tied embeddings a weak network just repeats its input token)
  // and the logits spread over a few units, so greedy and sampled output both vary.
  const float h = static_cast<float>(m.config.hidden_size);
  const float in = 1.0f / std::sqrt(h);
  const float inter = 1.0f / std::sqrt(static_cast<float>(m.config.intermediate_size));
  Scales s{/*embed=*/0.25f, /*q=*/2.0f * in, /*k=*/2.0f * in, /*v=*/in,      /*o=*/in,
           /*gate=*/in,     /*up=*/in,       /*down=*/inter,  /*bias=*/0.02f};
  // Random signs in the final norm decorrelate the output from the input token's own
  // (tied) embedding, which would otherwise win the argmax and repeat forever.
  s.final_norm = -1.0f;
  constexpr uint64_t kSeed = 0x5375706572706F73ull;  // "Superpos"
  for (const TensorPlan& p : PlanTensors(m.config, s)) {
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    std::vector<float> data(static_cast<size_t>(n));
    FillTensor(p, kSeed, 0, n, data.data());
    m.weights->Add(p.name, p.shape, std::move(data));
  }
  return m;
}

absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& config, DType dtype,
                              uint64_t seed) {
  try {
    ModelConfig c = config;
    c.dtype = dtype;
    if (c.vocab_size < 258) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteRandomModel: vocab_size ", c.vocab_size,
                       " is smaller than the 258 tokens of the byte-level tokenizer"));
    }
    const std::string config_json = ModelConfigToJson(c);
    // The written config must load back: reject inconsistent configs up front.
    SP_RETURN_IF_ERROR(ParseModelConfig(config_json, dir + "/config.json").status());
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", ec.message()));
    SP_RETURN_IF_ERROR(WriteText(dir + "/config.json", config_json));
    nlohmann::ordered_json gen;
    if (c.bos_token_id >= 0) gen["bos_token_id"] = c.bos_token_id;
    if (c.eos_token_ids.size() == 1) {
      gen["eos_token_id"] = c.eos_token_ids[0];
    } else if (!c.eos_token_ids.empty()) {
      gen["eos_token_id"] = c.eos_token_ids;
    }
    SP_RETURN_IF_ERROR(WriteText(dir + "/generation_config.json", gen.dump(2) + "\n"));
    SP_RETURN_IF_ERROR(WriteText(dir + "/tokenizer.json", ByteLevelTokenizerJson(c.vocab_size)));

    const Scales s{0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f, 0.02f};
    const std::vector<TensorPlan> plan = PlanTensors(c, s);
    std::vector<TensorSpec> specs;
    specs.reserve(plan.size());
    for (const TensorPlan& p : plan) specs.push_back(TensorSpec{p.name, p.shape});
    return WriteSafetensorsStreaming(dir + "/model.safetensors", specs, dtype,
                                     [&](size_t t, int64_t offset, int64_t count, float* out) {
                                       FillTensor(plan[t], seed, offset, count, out);
                                     });
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(dir, ": ", e.what()));
  }
}

}  // namespace superpose::engine
