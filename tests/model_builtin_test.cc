// The built-in demo model, its byte-level tokenizer.json, and the random-model writer.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "engine/model/builtin.h"
#include "engine/model/config.h"
#include "engine/model/tokenizer.h"
#include "engine/model/weights.h"

namespace superpose::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAreArray;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = std::filesystem::temp_directory_path().string() + "/sp_builtin_XXXXXX";
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The tensors a Hugging Face Llama-family checkpoint has, with their shapes.
std::map<std::string, std::vector<int64_t>> ExpectedTensors(const ModelConfig& c) {
  std::map<std::string, std::vector<int64_t>> t;
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size, V = c.vocab_size;
  t["model.embed_tokens.weight"] = {V, H};
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t[p + "self_attn.q_proj.weight"] = {c.num_heads * D, H};
    t[p + "self_attn.k_proj.weight"] = {c.num_kv_heads * D, H};
    t[p + "self_attn.v_proj.weight"] = {c.num_kv_heads * D, H};
    t[p + "self_attn.o_proj.weight"] = {H, c.num_heads * D};
    if (c.attention_bias) {
      t[p + "self_attn.q_proj.bias"] = {c.num_heads * D};
      t[p + "self_attn.k_proj.bias"] = {c.num_kv_heads * D};
      t[p + "self_attn.v_proj.bias"] = {c.num_kv_heads * D};
    }
    if (c.qk_norm) {
      t[p + "self_attn.q_norm.weight"] = {D};
      t[p + "self_attn.k_norm.weight"] = {D};
    }
    t[p + "mlp.gate_proj.weight"] = {I, H};
    t[p + "mlp.up_proj.weight"] = {I, H};
    t[p + "mlp.down_proj.weight"] = {H, I};
    t[p + "input_layernorm.weight"] = {H};
    t[p + "post_attention_layernorm.weight"] = {H};
  }
  t["model.norm.weight"] = {H};
  if (!c.tie_word_embeddings) t["lm_head.weight"] = {V, H};
  return t;
}

void ExpectTensorsMatch(const ModelConfig& c, const WeightSource& w) {
  const auto expected = ExpectedTensors(c);
  std::vector<std::string> names;
  for (const auto& [n, s] : expected) names.push_back(n);
  EXPECT_THAT(w.Names(), UnorderedElementsAreArray(names));
  int64_t total = 0;
  for (const auto& [name, shape] : expected) {
    auto v = w.Get(name);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_EQ(v->shape, shape) << name;
    total += v->numel();
  }
  EXPECT_EQ(total, c.NumParameters());
}

// ---- Reference forward pass (HF Llama semantics, naive, float) ---------------------------

class RefModel {
 public:
  RefModel(const ModelConfig& c, const WeightSource& w) : c_(c) {
    for (const auto& [name, shape] : ExpectedTensors(c)) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> v(n);
      EXPECT_TRUE(w.ReadF32(name, shape, v.data()).ok()) << name;
      t_[name] = std::move(v);
    }
    inv_freq_ = RopeInvFreq(c);
  }

  // Logits of the next token after `tokens`.
  std::vector<float> Logits(const std::vector<int32_t>& tokens) const {
    const int H = c_.hidden_size, D = c_.head_dim, nq = c_.num_heads, nkv = c_.num_kv_heads;
    const int T = static_cast<int>(tokens.size());
    const std::vector<float>& emb = t_.at("model.embed_tokens.weight");
    std::vector<std::vector<float>> x(T);
    for (int t = 0; t < T; ++t)
      x[t].assign(emb.begin() + tokens[t] * H, emb.begin() + (tokens[t] + 1) * H);
    for (int l = 0; l < c_.num_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      std::vector<std::vector<float>> q(T), k(T), v(T);
      for (int t = 0; t < T; ++t) {
        std::vector<float> xn = Norm(x[t], T_(p + "input_layernorm.weight"));
        q[t] = MatVec(T_(p + "self_attn.q_proj.weight"), xn, nq * D);
        k[t] = MatVec(T_(p + "self_attn.k_proj.weight"), xn, nkv * D);
        v[t] = MatVec(T_(p + "self_attn.v_proj.weight"), xn, nkv * D);
        if (c_.attention_bias) {
          Add(&q[t], T_(p + "self_attn.q_proj.bias"));
          Add(&k[t], T_(p + "self_attn.k_proj.bias"));
          Add(&v[t], T_(p + "self_attn.v_proj.bias"));
        }
        for (int h = 0; h < nq; ++h) Rope(q[t].data() + h * D, t, p + "self_attn.q_norm.weight");
        for (int h = 0; h < nkv; ++h) Rope(k[t].data() + h * D, t, p + "self_attn.k_norm.weight");
      }
      for (int t = 0; t < T; ++t) {
        std::vector<float> attn(nq * D, 0.0f);
        for (int h = 0; h < nq; ++h) {
          const int kh = h / (nq / nkv);
          std::vector<double> s(t + 1);
          double mx = -1e30;
          for (int u = 0; u <= t; ++u) {
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += q[t][h * D + d] * k[u][kh * D + d];
            s[u] = dot / std::sqrt(static_cast<double>(D));
            mx = std::max(mx, s[u]);
          }
          double z = 0;
          for (double& e : s) z += (e = std::exp(e - mx));
          for (int u = 0; u <= t; ++u) {
            for (int d = 0; d < D; ++d)
              attn[h * D + d] += static_cast<float>(s[u] / z) * v[u][kh * D + d];
          }
        }
        Add(&x[t], MatVec(T_(p + "self_attn.o_proj.weight"), attn, H));
        std::vector<float> xn = Norm(x[t], T_(p + "post_attention_layernorm.weight"));
        std::vector<float> g = MatVec(T_(p + "mlp.gate_proj.weight"), xn, c_.intermediate_size);
        std::vector<float> up = MatVec(T_(p + "mlp.up_proj.weight"), xn, c_.intermediate_size);
        for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * up[i];
        Add(&x[t], MatVec(T_(p + "mlp.down_proj.weight"), g, H));
      }
    }
    std::vector<float> xn = Norm(x[T - 1], T_("model.norm.weight"));
    return MatVec(c_.tie_word_embeddings ? emb : T_("lm_head.weight"), xn, c_.vocab_size);
  }

 private:
  const std::vector<float>& T_(const std::string& n) const { return t_.at(n); }
  std::vector<float> Norm(const std::vector<float>& x, const std::vector<float>& w) const {
    double ss = 0;
    for (float e : x) ss += static_cast<double>(e) * e;
    const float r = static_cast<float>(1.0 / std::sqrt(ss / x.size() + c_.rms_norm_eps));
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = x[i] * r * w[i];
    return out;
  }
  static std::vector<float> MatVec(const std::vector<float>& m, const std::vector<float>& x,
                                   int rows) {
    const size_t cols = x.size();
    std::vector<float> out(rows);
    for (int r = 0; r < rows; ++r) {
      double acc = 0;
      for (size_t j = 0; j < cols; ++j) acc += m[r * cols + j] * x[j];
      out[r] = static_cast<float>(acc);
    }
    return out;
  }
  static void Add(std::vector<float>* x, const std::vector<float>& y) {
    for (size_t i = 0; i < y.size(); ++i) (*x)[i] += y[i];
  }
  void Rope(float* v, int pos, const std::string& norm) const {
    const int D = c_.head_dim, half = D / 2;
    if (c_.qk_norm) {
      std::vector<float> h(v, v + D);
      h = Norm(h, T_(norm));
      std::copy(h.begin(), h.end(), v);
    }
    for (int i = 0; i < half; ++i) {
      const double a = pos * static_cast<double>(inv_freq_[i]);
      const float cs = static_cast<float>(std::cos(a)), sn = static_cast<float>(std::sin(a));
      const float x0 = v[i], x1 = v[i + half];
      v[i] = x0 * cs - x1 * sn;
      v[i + half] = x1 * cs + x0 * sn;
    }
  }

  const ModelConfig& c_;
  std::map<std::string, std::vector<float>> t_;
  std::vector<float> inv_freq_;
};

int32_t Argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// ---- Tokenizer JSON -----------------------------------------------------------------------

// GPT-2's byte-to-unicode character of byte b, as UTF-8 (written out independently).
std::string Gpt2ByteChar(int b) {
  int cp;
  if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) {
    cp = b;
  } else {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      const bool printable =
          (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
      if (!printable) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

TEST(ByteLevelTokenizerTest, IsAValidByteLevelBpeTokenizerJson) {
  const std::string text = ByteLevelTokenizerJson();
  const nlohmann::json j = nlohmann::json::parse(text);
  const int32_t size = ByteLevelTokenizerSize();
  EXPECT_GT(size, 258 + 50);  // some merges were learned
  EXPECT_LE(size, kBuiltinVocabLimit);

  EXPECT_EQ(j["version"], "1.0");
  EXPECT_EQ(j["pre_tokenizer"]["type"], "ByteLevel");
  EXPECT_EQ(j["pre_tokenizer"]["add_prefix_space"], false);
  EXPECT_EQ(j["pre_tokenizer"]["use_regex"], true);
  EXPECT_EQ(j["decoder"]["type"], "ByteLevel");
  EXPECT_TRUE(j["normalizer"].is_null());
  EXPECT_EQ(j["post_processor"]["type"], "TemplateProcessing");
  EXPECT_EQ(j["post_processor"]["single"][0]["SpecialToken"]["id"], "<s>");
  EXPECT_EQ(j["post_processor"]["single"][1]["Sequence"]["id"], "A");
  EXPECT_EQ(j["post_processor"]["special_tokens"]["<s>"]["ids"], nlohmann::json({256}));

  ASSERT_EQ(j["added_tokens"].size(), 2u);
  EXPECT_EQ(j["added_tokens"][0]["id"], 256);
  EXPECT_EQ(j["added_tokens"][0]["content"], "<s>");
  EXPECT_EQ(j["added_tokens"][0]["special"], true);
  EXPECT_EQ(j["added_tokens"][1]["id"], 257);
  EXPECT_EQ(j["added_tokens"][1]["content"], "</s>");
  EXPECT_EQ(j["added_tokens"][1]["special"], true);

  const nlohmann::json& m = j["model"];
  EXPECT_EQ(m["type"], "BPE");
  EXPECT_EQ(m["byte_fallback"], false);
  EXPECT_TRUE(m["unk_token"].is_null());
  const nlohmann::json& vocab = m["vocab"];
  ASSERT_EQ(static_cast<int32_t>(vocab.size()), size);
  // ids 0..255: the bytes in byte order.
  for (int b = 0; b < 256; ++b) ASSERT_EQ(vocab.at(Gpt2ByteChar(b)), b) << b;
  EXPECT_EQ(vocab.at("Ġ"), 32);
  EXPECT_EQ(vocab.at("Ċ"), 10);
  EXPECT_EQ(vocab.at("A"), 65);
  EXPECT_EQ(vocab.at("<s>"), 256);
  EXPECT_EQ(vocab.at("</s>"), 257);
  std::set<int> ids;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) ids.insert(it.value().get<int>());
  EXPECT_EQ(static_cast<int32_t>(ids.size()), size);
  EXPECT_EQ(*ids.begin(), 0);
  EXPECT_EQ(*ids.rbegin(), size - 1);

  // Merge k creates token 258 + k from two tokens that exist before it.
  const nlohmann::json& merges = m["merges"];
  ASSERT_EQ(static_cast<int32_t>(merges.size()), size - 258);
  for (size_t k = 0; k < merges.size(); ++k) {
    const std::string line = merges[k];
    const size_t sp = line.find(' ');
    ASSERT_NE(sp, std::string::npos) << line;
    const std::string a = line.substr(0, sp), b = line.substr(sp + 1);
    ASSERT_TRUE(vocab.contains(a) && vocab.contains(b)) << line;
    EXPECT_LT(vocab.at(a).get<int>(), 258 + static_cast<int>(k)) << line;
    EXPECT_LT(vocab.at(b).get<int>(), 258 + static_cast<int>(k)) << line;
    EXPECT_EQ(vocab.at(a + b), 258 + static_cast<int>(k)) << line;
  }
  // Frequent English pairs come first.
  EXPECT_THAT(std::vector<std::string>(merges.begin(), merges.begin() + 3),
              ::testing::Contains("h e"));
  EXPECT_TRUE(vocab.contains("Ġthe"));
  // Deterministic.
  EXPECT_EQ(ByteLevelTokenizerJson(), text);
}

// Ids from the Hugging Face `tokenizers` library (npm package 0.23.2) encoding with this
// tokenizer.json and add_special_tokens=true.
TEST(ByteLevelTokenizerTest, EncodesLikeHuggingFaceTokenizers) {
  auto tok = Tokenizer::FromJson(ByteLevelTokenizerJson(), "", "builtin tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), ByteLevelTokenizerSize());
  EXPECT_EQ((*tok)->TokenToId("<s>"), 256);
  EXPECT_EQ((*tok)->TokenToId("</s>"), 257);
  EXPECT_TRUE((*tok)->IsSpecial(256));
  EXPECT_TRUE((*tok)->IsSpecial(257));
  EXPECT_FALSE((*tok)->IsSpecial(65));
  EXPECT_EQ((*tok)->kind(), "byte-level-bpe");
  const std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {"Hello world, the market was there.",
       {256, 72, 101, 298, 111, 377, 281, 44, 260, 278, 290, 321, 283, 260, 271, 46}},
      {"The children walked down the road and they're happy.",
       {256, 84, 258, 272, 285, 281, 271, 110, 269, 108, 366, 288, 337, 110,
        260, 32, 114, 111, 310, 268, 341, 39,  271, 304, 112, 112, 121, 46}},
      {"caf\xC3\xA9 \xF0\x9F\x99\x82  two  spaces\nnew line",
       {256, 99, 97,  102, 195, 169, 32, 240, 159, 153, 130, 32,  259, 119,
        111, 32, 263, 112, 359, 287, 10, 110, 101, 119, 309, 264, 101}},
      {"", {256}},
  };
  for (const auto& [text, ids] : cases) {
    EXPECT_EQ((*tok)->Encode(text, true), ids) << text;
    EXPECT_EQ((*tok)->Decode(ids, true), text);
  }
}

TEST(ByteLevelTokenizerTest, SizeLimit) {
  EXPECT_EQ(ByteLevelTokenizerSize(258), 258);
  EXPECT_EQ(ByteLevelTokenizerSize(100), 258);  // the bytes and specials always exist
  EXPECT_EQ(ByteLevelTokenizerSize(300), 300);
  const nlohmann::json j = nlohmann::json::parse(ByteLevelTokenizerJson(300));
  EXPECT_EQ(j["model"]["vocab"].size(), 300u);
  EXPECT_EQ(j["model"]["merges"].size(), 42u);
  // A large limit stops when the built-in text has no pair left that occurs twice.
  const int32_t big = ByteLevelTokenizerSize(32000);
  EXPECT_GT(big, kBuiltinVocabLimit);
  EXPECT_LT(big, 32000);
}

// ---- Built-in model ----------------------------------------------------------------------

TEST(BuiltinModelTest, ConfigShapesAndDeterminism) {
  BuiltinModel m = MakeBuiltinModel();
  const ModelConfig& c = m.config;
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 128);
  EXPECT_EQ(c.num_layers, 4);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.intermediate_size, 352);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.vocab_size, ByteLevelTokenizerSize());
  EXPECT_EQ(c.bos_token_id, 256);
  EXPECT_THAT(c.eos_token_ids, ElementsAre(257));
  EXPECT_EQ(m.tokenizer_json, ByteLevelTokenizerJson());
  // The config is one config.json can express.
  auto back = ParseModelConfig(ModelConfigToJson(c), "builtin");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->NumParameters(), c.NumParameters());

  ASSERT_NE(m.weights, nullptr);
  ExpectTensorsMatch(c, *m.weights);

  BuiltinModel again = MakeBuiltinModel();
  for (const std::string& name : m.weights->Names()) {
    auto a = m.weights->Get(name);
    auto b = again.weights->Get(name);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(a->nbytes, b->nbytes);
    EXPECT_EQ(std::memcmp(a->data, b->data, a->nbytes), 0) << name;
    const float* f = static_cast<const float*>(a->data);
    for (int64_t i = 0; i < a->numel(); ++i) ASSERT_TRUE(std::isfinite(f[i])) << name;
    if (name.find("layernorm") != std::string::npos) {
      for (int64_t i = 0; i < a->numel(); ++i) ASSERT_EQ(f[i], 1.0f) << name;
    } else if (name == "model.norm.weight") {
      // Random signs (see MakeBuiltinModel).
      int neg = 0;
      for (int64_t i = 0; i < a->numel(); ++i) {
        ASSERT_EQ(std::fabs(f[i]), 1.0f);
        neg += f[i] < 0;
      }
      EXPECT_GT(neg, 32);
      EXPECT_LT(neg, 96);
    } else {
      double ss = 0, sum = 0;
      for (int64_t i = 0; i < a->numel(); ++i) {
        ss += static_cast<double>(f[i]) * f[i];
        sum += f[i];
      }
      EXPECT_GT(ss, 0) << name;
      EXPECT_LT(std::fabs(sum / a->numel()), 0.05 * std::sqrt(ss / a->numel()) + 1e-3) << name;
    }
  }
  // Pinned values: the same weights on every machine and build.
  auto emb = m.weights->Get("model.embed_tokens.weight");
  ASSERT_TRUE(emb.ok());
  const float* e = static_cast<const float*>(emb->data);
  EXPECT_EQ(e[0], 0x1.d8ee5ap-3f);
  EXPECT_EQ(e[1], 0x1.0d0256p-6f);
  EXPECT_EQ(e[12345], -0x1.ed416ep-5f);
}

TEST(BuiltinModelTest, GreedyGenerationVaries) {
  BuiltinModel m = MakeBuiltinModel();
  RefModel ref(m.config, *m.weights);
  for (const std::vector<int32_t>& prompt :
       {std::vector<int32_t>{256, 72, 101, 108, 108, 111}, std::vector<int32_t>{256},
        std::vector<int32_t>{256, 84, 104, 101, 32}}) {
    std::vector<int32_t> seq = prompt, out;
    for (int step = 0; step < 40; ++step) {
      const std::vector<float> logits = ref.Logits(seq);
      ASSERT_EQ(static_cast<int32_t>(logits.size()), m.config.vocab_size);
      for (float l : logits) ASSERT_TRUE(std::isfinite(l));
      if (step == 0) {  // spread enough for sampling to be peaked but varied
        float lo = logits[0], hi = logits[0];
        for (float l : logits) lo = std::min(lo, l), hi = std::max(hi, l);
        EXPECT_GT(hi - lo, 5.0f);
        EXPECT_LT(hi - lo, 40.0f);
      }
      const int32_t next = Argmax(logits);
      out.push_back(next);
      seq.push_back(next);
    }
    std::set<int32_t> distinct(out.begin(), out.end());
    int longest = 1, run = 1;
    for (size_t i = 1; i < out.size(); ++i) {
      run = out[i] == out[i - 1] ? run + 1 : 1;
      longest = std::max(longest, run);
    }
    EXPECT_GE(distinct.size(), 15u);
    EXPECT_LE(longest, 3);
  }
}

// ---- WriteRandomModel ---------------------------------------------------------------------

TEST(WriteRandomModelTest, TinyModelLoadsBack) {
  TempDir tmp;
  const std::string dir = tmp.path() + "/tiny";
  ModelConfig c = LlamaShapedConfig(64, 2, 4, 2, 160, 300);
  EXPECT_EQ(c.head_dim, 16);
  ASSERT_TRUE(WriteRandomModel(dir, c, DType::kBF16, 42).ok());
  for (const char* f :
       {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}) {
    EXPECT_TRUE(std::filesystem::exists(dir + "/" + f)) << f;
  }
  auto loaded = LoadModelConfig(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->hidden_size, 64);
  EXPECT_EQ(loaded->num_layers, 2);
  EXPECT_EQ(loaded->vocab_size, 300);
  EXPECT_EQ(loaded->dtype, DType::kBF16);
  EXPECT_FALSE(loaded->tie_word_embeddings);
  EXPECT_EQ(loaded->bos_token_id, 256);
  EXPECT_THAT(loaded->eos_token_ids, ElementsAre(257));
  auto w = OpenSafetensors(dir);
  ASSERT_TRUE(w.ok()) << w.status();
  ExpectTensorsMatch(*loaded, **w);
  auto q = (*w)->Get("model.layers.1.self_attn.q_proj.weight");
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->dtype, DType::kBF16);
  std::vector<float> v(q->numel());
  ASSERT_TRUE((*w)->ReadF32("model.layers.1.self_attn.q_proj.weight", q->shape, v.data()).ok());
  double ss = 0, mx = 0;
  for (float x : v) ss += x * x, mx = std::max(mx, std::fabs(static_cast<double>(x)));
  const double sd = std::sqrt(ss / v.size());
  EXPECT_NEAR(sd, 0.02, 0.002);
  EXPECT_LT(mx, 0.02 * 3.5);
  std::vector<float> norm(64);
  ASSERT_TRUE((*w)->ReadF32("model.norm.weight", {64}, norm.data()).ok());
  for (float x : norm) EXPECT_EQ(x, 1.0f);
  const nlohmann::json tok = nlohmann::json::parse(ReadAll(dir + "/tokenizer.json"));
  EXPECT_EQ(tok["model"]["vocab"].size(), 300u);

  // Same seed: same bytes; another seed: other weights.
  const std::string dir2 = tmp.path() + "/tiny2", dir3 = tmp.path() + "/tiny3";
  ASSERT_TRUE(WriteRandomModel(dir2, c, DType::kBF16, 42).ok());
  ASSERT_TRUE(WriteRandomModel(dir3, c, DType::kBF16, 43).ok());
  EXPECT_EQ(ReadAll(dir + "/model.safetensors"), ReadAll(dir2 + "/model.safetensors"));
  EXPECT_NE(ReadAll(dir + "/model.safetensors"), ReadAll(dir3 + "/model.safetensors"));
}

TEST(WriteRandomModelTest, Qwen3AndQwen2ShapedModels) {
  TempDir tmp;
  ModelConfig c = LlamaShapedConfig(64, 1, 4, 2, 96, 320);
  c.architecture = "Qwen3ForCausalLM";
  c.model_type = "qwen3";
  c.qk_norm = true;
  c.head_dim = 32;  // not hidden / heads
  c.tie_word_embeddings = true;
  ASSERT_TRUE(WriteRandomModel(tmp.path() + "/q3", c, DType::kF16, 1).ok());
  auto c3 = LoadModelConfig(tmp.path() + "/q3");
  ASSERT_TRUE(c3.ok()) << c3.status();
  EXPECT_TRUE(c3->qk_norm);
  EXPECT_EQ(c3->head_dim, 32);
  EXPECT_EQ(c3->dtype, DType::kF16);
  auto w3 = OpenSafetensors(tmp.path() + "/q3");
  ASSERT_TRUE(w3.ok()) << w3.status();
  ExpectTensorsMatch(*c3, **w3);

  c = LlamaShapedConfig(64, 1, 4, 2, 96, 320);
  c.architecture = "Qwen2ForCausalLM";
  c.model_type = "qwen2";
  c.attention_bias = true;
  ASSERT_TRUE(WriteRandomModel(tmp.path() + "/q2", c, DType::kF32, 1).ok());
  auto c2 = LoadModelConfig(tmp.path() + "/q2");
  ASSERT_TRUE(c2.ok()) << c2.status();
  EXPECT_TRUE(c2->attention_bias);
  auto w2 = OpenSafetensors(tmp.path() + "/q2");
  ASSERT_TRUE(w2.ok()) << w2.status();
  ExpectTensorsMatch(*c2, **w2);
}

TEST(WriteRandomModelTest, RejectsBadConfigs) {
  TempDir tmp;
  absl::Status small =
      WriteRandomModel(tmp.path() + "/m", LlamaShapedConfig(64, 1, 4, 2, 96, 100), DType::kBF16, 1);
  ASSERT_FALSE(small.ok());
  EXPECT_THAT(small.message(), HasSubstr("vocab_size 100"));
  absl::Status gqa =
      WriteRandomModel(tmp.path() + "/m", LlamaShapedConfig(64, 1, 4, 3, 96, 300), DType::kBF16, 1);
  ASSERT_FALSE(gqa.ok());
  EXPECT_THAT(gqa.message(), HasSubstr("num_key_value_heads"));
  EXPECT_FALSE(std::filesystem::exists(tmp.path() + "/m/model.safetensors"));
}

}  // namespace
}  // namespace superpose::engine
