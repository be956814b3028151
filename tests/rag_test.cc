// Superposition RAG on the real stories260k model: position layout, saliency and
// top-k units; the engine's path and answer logits against a dense causal forward with
// an explicit DAG mask (written here, independently of the backend); path-cache hits;
// pruning; a one-document request equals naive prompting; naive mode equals the flat
// prompt; no KV block leaks.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "absl/synchronization/mutex.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/rag/rag.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/forwarding_backend.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using engine::rag::Spec;
using testing::Collector;
using testing::Completion;

TEST(RagLayout, EquilibriumMatchesPaperExample) {
  // papers.md section 5: 3 docs of lengths 2, 4, 4 -> S = 3, delta = 1.5 / 0.75 / 0.75,
  // query starts at |p| + 3.
  Spec s;
  s.preamble = {1, 2, 3, 4, 5};
  s.documents = {{7, 8}, {7, 8, 9, 10}, {7, 8, 9, 11}};
  s.query = {20, 21};
  s.postamble = {30};
  const engine::rag::Layout l = engine::rag::ComputeLayout(s);
  EXPECT_FLOAT_EQ(l.span, 3.0f);
  EXPECT_FLOAT_EQ(l.doc_step[0], 1.5f);
  EXPECT_FLOAT_EQ(l.doc_step[1], 0.75f);
  EXPECT_FLOAT_EQ(l.doc_step[2], 0.75f);
  EXPECT_FLOAT_EQ(l.DocPosition(0, 1), 6.5f);
  EXPECT_FLOAT_EQ(l.DocPosition(1, 3), 7.25f);
  EXPECT_FLOAT_EQ(l.query_start, 8.0f);
  EXPECT_FLOAT_EQ(l.postamble_start, 10.0f);
  EXPECT_FLOAT_EQ(l.answer_start, 11.0f);

  s.options.positions = engine::rag::PositionMode::kLeftAligned;
  const engine::rag::Layout la = engine::rag::ComputeLayout(s);
  EXPECT_FLOAT_EQ(la.doc_step[0], 1.0f);
  EXPECT_FLOAT_EQ(la.query_start, 9.0f);  // |p| + longest document

  s.options.positions = engine::rag::PositionMode::kEquilibrium;
  s.options.canonical_span = 8.0f;
  const engine::rag::Layout lc = engine::rag::ComputeLayout(s);
  EXPECT_FLOAT_EQ(lc.doc_step[0], 4.0f);
  EXPECT_FLOAT_EQ(lc.doc_step[1], 2.0f);
  EXPECT_FLOAT_EQ(lc.query_start, 13.0f);
}

TEST(RagSaliency, ScoreAndTopK) {
  engine::rag::PathLikelihood ll;
  ll.query_sum = -6.0;
  ll.query_count = 3;
  ll.doc_sum = -10.0;
  ll.doc_count = 4;
  EXPECT_DOUBLE_EQ(engine::rag::Saliency(ll, 1.0f), -2.0 - 2.5);
  EXPECT_DOUBLE_EQ(engine::rag::Saliency(ll, 0.5f), -2.0 - 1.25);
  EXPECT_EQ(engine::rag::TopK({-3, -1, -2, -1.5}, 2), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(engine::rag::TopK({-3, -1, -2, -1.5}, 1), (std::vector<int32_t>{1}));
  EXPECT_EQ(engine::rag::TopK({-1, -1, -1}, 2), (std::vector<int32_t>{0, 1}));
}

// Wraps a backend and records the logits of every token of every step (asking the
// inner backend for all rows, returning the engine only the rows it asked for).
class RecordingBackend : public testing::ForwardingBackend {
 public:
  // `inner` is loaded already.
  RecordingBackend(engine::Backend* inner, int32_t vocab)
      : ForwardingBackend(inner), vocab_(vocab) {}
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    engine::BatchPlan all = plan;
    all.logits_for.clear();
    all.logits_top.clear();  // whole rows
    all.sampling.clear();
    for (int32_t i = 0; i < plan.num_tokens(); ++i) all.logits_for.push_back(i);
    engine::ForwardOutput full;
    absl::Status st = inner()->Forward(all, &full);
    if (!st.ok()) return st;
    absl::MutexLock lock(&mu_);
    for (const engine::SeqPlan& sp : plan.seqs) {
      for (int32_t j = 0; j < sp.num_tokens; ++j) {
        const int32_t t = sp.token_begin + j;
        Token tok;
        tok.token = plan.tokens[t];
        tok.position = plan.positions[t];
        tok.logits.assign(full.logits.begin() + static_cast<size_t>(t) * vocab_,
                          full.logits.begin() + static_cast<size_t>(t + 1) * vocab_);
        seqs_[sp.id].push_back(std::move(tok));
      }
    }
    std::vector<float> rows;
    for (int32_t row : plan.logits_for) {
      rows.insert(rows.end(), full.logits.begin() + static_cast<size_t>(row) * vocab_,
                  full.logits.begin() + static_cast<size_t>(row + 1) * vocab_);
    }
    engine::CompactLogits(plan, vocab_, rows.data(), out);  // as the engine asked
    out->logprobs = full.logprobs;
    return absl::OkStatus();
  }
  struct Token {
    int32_t token;
    float position;
    std::vector<float> logits;
  };
  std::map<engine::SeqId, std::vector<Token>> Take() {
    absl::MutexLock lock(&mu_);
    return std::move(seqs_);
  }

 private:
  int32_t vocab_;
  absl::Mutex mu_;
  std::map<engine::SeqId, std::vector<Token>> seqs_;
};

// A plain causal Llama forward pass in double precision over `tokens` at `positions`,
// where token i attends to token j iff allowed[i][j]. Returns logits per token.
std::vector<std::vector<double>> DenseForward(const engine::ModelBundle& m,
                                              const std::vector<int32_t>& tokens,
                                              const std::vector<float>& positions,
                                              const std::vector<std::vector<bool>>& allowed) {
  const engine::ModelConfig& c = m.config;
  const int64_t H = c.hidden_size, D = c.head_dim, NQ = c.num_heads, NKV = c.num_kv_heads;
  const int64_t I = c.intermediate_size, V = c.vocab_size;
  const int64_t T = static_cast<int64_t>(tokens.size());
  auto read = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> w(n);
    EXPECT_TRUE(m.weights->ReadF32(name, shape, w.data()).ok()) << name;
    return w;
  };
  auto rms = [&](const std::vector<double>& x, const std::vector<float>& g) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + c.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * g[i];
    return y;
  };
  auto matvec = [](const std::vector<float>& w, int64_t out, int64_t in,
                   const std::vector<double>& x) {
    std::vector<double> y(out, 0.0);
    for (int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (int64_t k = 0; k < in; ++k) acc += static_cast<double>(w[o * in + k]) * x[k];
      y[o] = acc;
    }
    return y;
  };
  const std::vector<float> inv_freq = engine::RopeInvFreq(c);
  auto rope = [&](std::vector<double>& v, int64_t heads, float pos) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < D / 2; ++i) {
        const double ang = static_cast<double>(pos) * inv_freq[i];
        const double a = v[h * D + i], b = v[h * D + i + D / 2];
        v[h * D + i] = a * std::cos(ang) - b * std::sin(ang);
        v[h * D + i + D / 2] = b * std::cos(ang) + a * std::sin(ang);
      }
    }
  };
  const std::vector<float> embed = read("model.embed_tokens.weight", {V, H});
  std::vector<std::vector<double>> x(T, std::vector<double>(H));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < H; ++k) x[t][k] = embed[tokens[t] * H + k];
  }
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const auto ln1 = read(p + "input_layernorm.weight", {H});
    const auto ln2 = read(p + "post_attention_layernorm.weight", {H});
    const auto wq = read(p + "self_attn.q_proj.weight", {NQ * D, H});
    const auto wk = read(p + "self_attn.k_proj.weight", {NKV * D, H});
    const auto wv = read(p + "self_attn.v_proj.weight", {NKV * D, H});
    const auto wo = read(p + "self_attn.o_proj.weight", {H, NQ * D});
    const auto wg = read(p + "mlp.gate_proj.weight", {I, H});
    const auto wu = read(p + "mlp.up_proj.weight", {I, H});
    const auto wd = read(p + "mlp.down_proj.weight", {H, I});
    std::vector<std::vector<double>> q(T), k(T), v(T);
    for (int64_t t = 0; t < T; ++t) {
      const auto xn = rms(x[t], ln1);
      q[t] = matvec(wq, NQ * D, H, xn);
      k[t] = matvec(wk, NKV * D, H, xn);
      v[t] = matvec(wv, NKV * D, H, xn);
      rope(q[t], NQ, positions[t]);
      rope(k[t], NKV, positions[t]);
    }
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> attn(NQ * D, 0.0);
      for (int64_t h = 0; h < NQ; ++h) {
        const int64_t kh = h / (NQ / NKV);
        std::vector<double> s(T, -INFINITY);
        double mx = -INFINITY;
        for (int64_t j = 0; j < T; ++j) {
          if (!allowed[t][j]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[t][h * D + d] * k[j][kh * D + d];
          s[j] = dot / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < T; ++j) {
          if (allowed[t][j]) sum += std::exp(s[j] - mx);
        }
        for (int64_t j = 0; j < T; ++j) {
          if (!allowed[t][j]) continue;
          const double pj = std::exp(s[j] - mx) / sum;
          for (int64_t d = 0; d < D; ++d) attn[h * D + d] += pj * v[j][kh * D + d];
        }
      }
      const auto o = matvec(wo, H, NQ * D, attn);
      for (int64_t d = 0; d < H; ++d) x[t][d] += o[d];
    }
    for (int64_t t = 0; t < T; ++t) {
      const auto xn = rms(x[t], ln2);
      const auto g = matvec(wg, I, H, xn);
      const auto u = matvec(wu, I, H, xn);
      std::vector<double> a(I);
      for (int64_t i = 0; i < I; ++i) a[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const auto dn = matvec(wd, H, I, a);
      for (int64_t d = 0; d < H; ++d) x[t][d] += dn[d];
    }
  }
  const auto norm = read("model.norm.weight", {H});
  const std::vector<float> head = c.tie_word_embeddings ? embed : read("lm_head.weight", {V, H});
  std::vector<std::vector<double>> logits(T);
  for (int64_t t = 0; t < T; ++t) logits[t] = matvec(head, V, H, rms(x[t], norm));
  return logits;
}

double LogSoftmaxAt(const std::vector<double>& z, int32_t target) {
  double mx = -INFINITY;
  for (double v : z) mx = std::max(mx, v);
  double sum = 0;
  for (double v : z) sum += std::exp(v - mx);
  return z[target] - mx - std::log(sum);
}

// Max |a - b| over a row relative to the row's largest |b|.
double RelErr(const std::vector<float>& a, const std::vector<double>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / std::max(scale, 1e-30);
}

class RagEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
  }
  std::unique_ptr<engine::Engine> MakeEngine(engine::Backend* backend,
                                             engine::EngineOptions eo = {}) {
    auto e = std::make_unique<engine::Engine>(eo, model_.config, model_.tokenizer.get(), backend);
    e->Start();
    return e;
  }
  std::unique_ptr<engine::Backend> MakeBackend(int32_t blocks = 256) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = blocks;
    opts.kv_block_size = 16;
    auto b = std::make_unique<engine::cpu::CpuBackend>(opts);
    EXPECT_TRUE(b->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    return b;
  }
  std::vector<int32_t> Enc(const std::string& s, bool bos = false) {
    return model_.tokenizer->Encode(s, bos);
  }
  Spec MakeSpec(int32_t docs, bool postamble) {
    Spec s;
    s.preamble = Enc("Read the stories and answer.", true);
    const std::vector<std::string> texts = {
        "Lily went to the park with her mom. She saw a big red ball.\n",
        "Tom had a little dog named Max. Max liked to run and jump in the garden all day.\n",
        "The sun was shining.\n",
        "Once upon a time there was a cat who loved fish. The cat was very happy.\n",
        "Sam found a shiny stone by the river and gave it to his sister.\n"};
    for (int32_t i = 0; i < docs; ++i) s.documents.push_back(Enc(texts[i % texts.size()]));
    s.query = Enc("What did Lily see at the park?");
    if (postamble) s.postamble = Enc(" Answer:");
    return s;
  }
  engine::Request RagRequest(const Spec& spec, int32_t max_new_tokens = 8) {
    engine::Request r = testing::GreedyRequest({}, max_new_tokens);
    r.rag = std::make_shared<Spec>(spec);
    return r;
  }
  engine::ModelBundle model_;
};

TEST_F(RagEngineTest, PathAndAnswerLogitsMatchDenseDagForward) {
  auto cpu = MakeBackend();
  RecordingBackend rec(cpu.get(), model_.config.vocab_size);
  auto eng = MakeEngine(&rec, engine::EngineOptions{.prefix_caching = false});
  Spec spec = MakeSpec(3, /*postamble=*/true);
  spec.options.top_k = 2;
  spec.options.path_cache = false;
  const Completion c = testing::RunRequest(*eng, RagRequest(spec, 4));
  ASSERT_TRUE(c.status.ok()) << c.status;
  ASSERT_NE(c.rag, nullptr);
  auto recorded = rec.Take();
  // Internal sequences in creation order: preamble, paths 0..n-1, answer.
  std::vector<std::vector<RecordingBackend::Token>> seqs;
  for (auto& [id, toks] : recorded) seqs.push_back(std::move(toks));
  const int32_t n = static_cast<int32_t>(spec.documents.size());
  ASSERT_EQ(static_cast<int32_t>(seqs.size()), n + 2);

  // The dense graph: [p][d_0 q_0][d_1 q_1][d_2 q_2][t] with the ForkJoin mask.
  const engine::rag::Layout layout = engine::rag::ComputeLayout(spec);
  std::vector<int32_t> tokens;
  std::vector<float> positions;
  std::vector<int32_t> seg;  // segment id of each token: 0 = p, 1+2i = d_i, 2+2i = q_i, 2n+1 = t
  auto add = [&](const std::vector<int32_t>& t, int32_t s, std::function<float(int32_t)> pos) {
    for (size_t j = 0; j < t.size(); ++j) {
      tokens.push_back(t[j]);
      positions.push_back(pos(static_cast<int32_t>(j)));
      seg.push_back(s);
    }
  };
  const float P = static_cast<float>(spec.preamble.size());
  add(spec.preamble, 0, [](int32_t j) { return static_cast<float>(j); });
  std::vector<int32_t> doc_begin(n), query_begin(n);
  for (int32_t i = 0; i < n; ++i) {
    doc_begin[i] = static_cast<int32_t>(tokens.size());
    // Positions written out from papers.md 1.2, not taken from the layout.
    double inv = 0;
    for (const auto& d : spec.documents) inv += 1.0 / d.size();
    const float S = static_cast<float>(n / inv);
    const float step = S / static_cast<float>(spec.documents[i].size());
    add(spec.documents[i], 1 + 2 * i, [&](int32_t j) { return P + j * step; });
    query_begin[i] = static_cast<int32_t>(tokens.size());
    add(spec.query, 2 + 2 * i, [&](int32_t j) { return P + S + j; });
  }
  const int32_t t_begin = static_cast<int32_t>(tokens.size());
  add(spec.postamble, 2 * n + 1, [&](int32_t j) { return layout.postamble_start + j; });
  const int32_t T = static_cast<int32_t>(tokens.size());

  // First pass: every path (the postamble attends to all paths; its rows are unused).
  auto mask_for = [&](const std::vector<bool>& kept) {
    std::vector<std::vector<bool>> allowed(T, std::vector<bool>(T, false));
    for (int32_t i = 0; i < T; ++i) {
      for (int32_t j = 0; j <= i; ++j) {
        const int32_t a = seg[i], b = seg[j];
        bool ok = a == b || b == 0;                                          // itself, the preamble
        if (a >= 1 && a <= 2 * n && a % 2 == 0 && b == a - 1) ok = true;     // q_i -> d_i
        if (a == 2 * n + 1 && b >= 1 && b <= 2 * n) ok = kept[(b - 1) / 2];  // t -> kept paths
        allowed[i][j] = ok;
      }
    }
    return allowed;
  };
  const auto dense_all =
      DenseForward(model_, tokens, positions, mask_for(std::vector<bool>(n, true)));

  // Preamble and path tokens.
  ASSERT_EQ(seqs[0].size(), spec.preamble.size());
  for (size_t j = 0; j < seqs[0].size(); ++j) {
    EXPECT_LT(RelErr(seqs[0][j].logits, dense_all[j]), 1e-4) << "preamble token " << j;
  }
  std::vector<double> dense_scores(n);
  for (int32_t i = 0; i < n; ++i) {
    const auto& path = seqs[1 + i];
    const int32_t dl = static_cast<int32_t>(spec.documents[i].size());
    const int32_t ql = static_cast<int32_t>(spec.query.size());
    ASSERT_EQ(static_cast<int32_t>(path.size()), dl + ql) << "path " << i;
    for (int32_t j = 0; j < dl + ql; ++j) {
      const int32_t row = j < dl ? doc_begin[i] + j : query_begin[i] + (j - dl);
      EXPECT_EQ(path[j].token, tokens[row]);
      EXPECT_FLOAT_EQ(path[j].position, positions[row]);
      EXPECT_LT(RelErr(path[j].logits, dense_all[row]), 1e-4) << "path " << i << " token " << j;
    }
    // Saliency from the dense logits.
    double ld = 0, lq = 0;
    for (int32_t j = 1; j < dl; ++j)
      ld += LogSoftmaxAt(dense_all[doc_begin[i] + j - 1], tokens[doc_begin[i] + j]);
    for (int32_t j = 1; j < ql; ++j)
      lq += LogSoftmaxAt(dense_all[query_begin[i] + j - 1], tokens[query_begin[i] + j]);
    dense_scores[i] = lq / (ql - 1) + ld / (dl - 1);
    EXPECT_NEAR(c.rag->docs[i].score, dense_scores[i], 1e-4) << "path " << i;
  }
  // Pruning keeps exactly the top-k of the scores.
  const std::vector<int32_t> top = engine::rag::TopK(dense_scores, spec.options.top_k);
  std::vector<bool> kept(n, false);
  for (int32_t a : top) kept[a] = true;
  for (int32_t i = 0; i < n; ++i) EXPECT_EQ(c.rag->docs[i].kept, kept[i]) << "path " << i;

  // The postamble (the first answer token comes from its last row) over the kept paths.
  const auto dense_kept = DenseForward(model_, tokens, positions, mask_for(kept));
  const auto& answer = seqs[n + 1];
  ASSERT_GE(answer.size(), spec.postamble.size());
  for (size_t j = 0; j < spec.postamble.size(); ++j) {
    EXPECT_EQ(answer[j].token, tokens[t_begin + j]);
    EXPECT_LT(RelErr(answer[j].logits, dense_kept[t_begin + j]), 1e-4) << "postamble token " << j;
  }
  // Greedy: the first answer token is the argmax of the last postamble row.
  const auto& last = dense_kept[T - 1];
  EXPECT_EQ(c.tokens[0], std::max_element(last.begin(), last.end()) - last.begin());
  int64_t pruned = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (!kept[i]) pruned += spec.documents[i].size() + spec.query.size();
  }
  EXPECT_EQ(c.rag->pruned_tokens, pruned);
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
}

TEST_F(RagEngineTest, OneDocumentEqualsNaivePrompting) {
  auto cpu = MakeBackend();
  auto eng = MakeEngine(cpu.get(), engine::EngineOptions{.prefix_caching = false});
  Spec spec = MakeSpec(1, /*postamble=*/false);
  spec.options.path_cache = false;
  const Completion sp = testing::RunRequest(*eng, RagRequest(spec, 12));
  ASSERT_TRUE(sp.status.ok()) << sp.status;
  const Completion flat =
      testing::RunRequest(*eng, testing::GreedyRequest(engine::rag::Flatten(spec), 12));
  ASSERT_TRUE(flat.status.ok());
  EXPECT_EQ(sp.tokens, flat.tokens);
  EXPECT_EQ(sp.tokens.size(), 12u);
}

TEST_F(RagEngineTest, NaiveModeEqualsFlatPrompt) {
  auto cpu = MakeBackend();
  auto eng = MakeEngine(cpu.get());
  Spec spec = MakeSpec(4, /*postamble=*/true);
  spec.options.mode = engine::rag::Mode::kNaive;
  const Completion naive = testing::RunRequest(*eng, RagRequest(spec, 10));
  ASSERT_TRUE(naive.status.ok()) << naive.status;
  const Completion flat =
      testing::RunRequest(*eng, testing::GreedyRequest(engine::rag::Flatten(spec), 10));
  EXPECT_EQ(naive.tokens, flat.tokens);
  ASSERT_NE(naive.rag, nullptr);
  EXPECT_EQ(naive.rag->mode, engine::rag::Mode::kNaive);
  EXPECT_GT(naive.rag->naive_flops.total, 0);
}

TEST_F(RagEngineTest, PathCacheHitReusesDocumentsAndGivesTheSameAnswer) {
  auto cpu = MakeBackend();
  auto eng = MakeEngine(cpu.get());
  Spec spec = MakeSpec(4, /*postamble=*/true);
  spec.options.top_k = 2;
  const Completion cold = testing::RunRequest(*eng, RagRequest(spec, 10));
  ASSERT_TRUE(cold.status.ok()) << cold.status;
  const Completion warm = testing::RunRequest(*eng, RagRequest(spec, 10));
  ASSERT_TRUE(warm.status.ok()) << warm.status;
  EXPECT_EQ(cold.tokens, warm.tokens);
  int64_t doc_tokens = 0;
  for (const auto& d : spec.documents) doc_tokens += d.size();
  const int64_t n = static_cast<int64_t>(spec.documents.size());
  for (size_t i = 0; i < spec.documents.size(); ++i) {
    EXPECT_FALSE(cold.rag->docs[i].cached);
    EXPECT_TRUE(warm.rag->docs[i].cached);
    EXPECT_NEAR(cold.rag->docs[i].score, warm.rag->docs[i].score, 1e-5);
    EXPECT_EQ(cold.rag->docs[i].doc_ll, warm.rag->docs[i].doc_ll);
    EXPECT_EQ(cold.rag->docs[i].kept, warm.rag->docs[i].kept);
  }
  EXPECT_EQ(warm.rag->path_cache_tokens, doc_tokens);
  // Warm: only the query copies and the postamble are computed (the preamble's full
  // blocks come from the prefix cache, its tail is recomputed).
  const int64_t preamble_computed =
      static_cast<int64_t>(spec.preamble.size()) - warm.rag->prefix_cache_tokens;
  EXPECT_EQ(warm.rag->computed_tokens, preamble_computed +
                                           n * static_cast<int64_t>(spec.query.size()) +
                                           static_cast<int64_t>(spec.postamble.size()));
  EXPECT_EQ(cold.rag->computed_tokens, static_cast<int64_t>(spec.preamble.size()) + doc_tokens +
                                           n * static_cast<int64_t>(spec.query.size()) +
                                           static_cast<int64_t>(spec.postamble.size()));
  EXPECT_LT(warm.rag->flops.total, cold.rag->flops.total);
  EXPECT_LE(cold.rag->flops.critical_path, cold.rag->flops.total);
  EXPECT_EQ(eng->stats().path_cache_hits, n);
  // A different tenant never sees these entries.
  engine::Request other = RagRequest(spec, 10);
  other.tenant = "other";
  const Completion o = testing::RunRequest(*eng, std::move(other));
  ASSERT_TRUE(o.status.ok());
  for (const auto& d : o.rag->docs) EXPECT_FALSE(d.cached);
  EXPECT_EQ(o.tokens, cold.tokens);
  // Nothing referenced once every request is done (cached blocks are evictable).
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
}

TEST_F(RagEngineTest, PathCacheEntriesAreEvictedLruWithOtherBlocks) {
  auto cpu = MakeBackend(/*blocks=*/36);
  auto eng = MakeEngine(cpu.get());
  Spec spec = MakeSpec(3, /*postamble=*/true);
  const Completion first = testing::RunRequest(*eng, RagRequest(spec, 6));
  ASSERT_TRUE(first.status.ok()) << first.status;
  EXPECT_GT(eng->blocks().cached_blocks(), 0);
  // Plain traffic that needs nearly the whole pool evicts the cached documents.
  std::vector<int32_t> long_prompt;
  while (long_prompt.size() < 560) {
    for (int32_t t : Enc("The little dog ran to the big tree and the cat sat on the mat. ")) {
      long_prompt.push_back(t);
    }
  }
  long_prompt.resize(560);
  const Completion plain = testing::RunRequest(*eng, testing::GreedyRequest(long_prompt, 40));
  EXPECT_EQ(plain.status.code(), absl::StatusCode::kInvalidArgument);  // > 512 context
  long_prompt.resize(500);
  const Completion fits = testing::RunRequest(*eng, testing::GreedyRequest(long_prompt, 8));
  ASSERT_TRUE(fits.status.ok()) << fits.status;
  EXPECT_GT(eng->blocks().evictions(), 0);
  const Completion again = testing::RunRequest(*eng, RagRequest(spec, 6));
  ASSERT_TRUE(again.status.ok()) << again.status;
  int cached = 0;
  for (const auto& d : again.rag->docs) cached += d.cached;
  EXPECT_LT(cached, 3);  // at least one document was evicted and recomputed
  EXPECT_EQ(again.tokens, first.tokens);
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
}

TEST_F(RagEngineTest, CancelAndTinyPoolReleaseEveryBlock) {
  auto cpu = MakeBackend(/*blocks=*/12);
  auto eng = MakeEngine(cpu.get());
  // Too big for 12 blocks of 16 tokens once all paths are live: fails cleanly.
  Spec big = MakeSpec(5, true);
  for (auto& d : big.documents) {
    const auto copy = d;
    for (int k = 0; k < 2; ++k) d.insert(d.end(), copy.begin(), copy.end());
  }
  const Completion failed = testing::RunRequest(*eng, RagRequest(big, 4));
  EXPECT_EQ(failed.status.code(), absl::StatusCode::kResourceExhausted) << failed.status;
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
  // Cancel mid-flight.
  Collector col;
  auto h = eng->Submit(RagRequest(MakeSpec(2, true), 200), col.Callback());
  ASSERT_TRUE(h.ok());
  eng->Cancel(*h);
  EXPECT_EQ(col.Wait().status.code(), absl::StatusCode::kCancelled);
  // A request that fits still works afterwards.
  const Completion ok = testing::RunRequest(*eng, RagRequest(MakeSpec(2, true), 4));
  EXPECT_TRUE(ok.status.ok()) << ok.status;
  eng->Shutdown(absl::ZeroDuration());
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
}

// Paths preempted mid-prefill (a running decode needs their blocks) are computed again
// from their first token: their scores restart with them (SequenceOwner::OnPreempted),
// so the report and the answer equal an uncontended run's, bitwise (the CPU forward is
// batch- and chunk-invariant).
TEST_F(RagEngineTest, PreemptedPathsScoreTheSameAsUncontended) {
  Spec spec = MakeSpec(5, /*postamble=*/true);
  spec.options.path_cache = false;
  auto roomy = MakeBackend();
  auto ref_eng = MakeEngine(roomy.get(), engine::EngineOptions{.prefix_caching = false});
  const Completion ref = testing::RunRequest(*ref_eng, RagRequest(spec, 6));
  ASSERT_TRUE(ref.status.ok()) << ref.status;
  ref_eng->Shutdown(absl::ZeroDuration());

  // An older request holds 13 blocks after its 200-token prompt and takes another every
  // 16 steps; the RAG request's finished paths hold theirs until the join, so its newest
  // path is preempted when the older one grows, and is computed again after it finishes.
  auto tight = MakeBackend(/*blocks=*/26);
  engine::EngineOptions eo;
  eo.prefix_caching = false;
  eo.max_batch_tokens = 8;  // paths prefill in chunks of 7 beside the decode
  // Both queued before the loop starts: the same schedule whatever the machine's speed.
  auto eng =
      std::make_unique<engine::Engine>(eo, model_.config, model_.tokenizer.get(), tight.get());
  std::vector<int32_t> long_prompt = Enc("Once upon a time", true);
  while (long_prompt.size() < 200) {
    const std::vector<int32_t> more = Enc(" there was a little girl who liked to play outside.");
    long_prompt.insert(long_prompt.end(), more.begin(), more.end());
  }
  long_prompt.resize(200);
  Collector hog;
  ASSERT_TRUE(eng->Submit(testing::GreedyRequest(long_prompt, 20), hog.Callback()).ok());
  Collector rag;
  ASSERT_TRUE(eng->Submit(RagRequest(spec, 6), rag.Callback()).ok());
  eng->Start();
  const Completion got = rag.Wait();
  ASSERT_TRUE(got.status.ok()) << got.status;
  EXPECT_TRUE(hog.Wait().status.ok());
  EXPECT_GT(eng->stats().preemptions, 0) << "the pool no longer forces preemption";
  ASSERT_EQ(got.rag->docs.size(), ref.rag->docs.size());
  for (size_t i = 0; i < ref.rag->docs.size(); ++i) {
    EXPECT_EQ(got.rag->docs[i].doc_ll, ref.rag->docs[i].doc_ll) << i;
    EXPECT_EQ(got.rag->docs[i].query_ll, ref.rag->docs[i].query_ll) << i;
    EXPECT_EQ(got.rag->docs[i].kept, ref.rag->docs[i].kept) << i;
  }
  EXPECT_EQ(got.tokens, ref.tokens);
  eng->Shutdown(absl::ZeroDuration());
  EXPECT_EQ(eng->blocks().free_blocks(), eng->blocks().num_blocks());
}

TEST_F(RagEngineTest, TensorParallelGivesTheSameScoresAndAnswer) {
  Spec spec = MakeSpec(4, /*postamble=*/true);
  spec.options.top_k = 2;
  spec.options.path_cache = false;
  std::vector<Completion> runs;
  for (int32_t tp : {1, 2}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 128;
    opts.kv_block_size = 16;
    opts.tensor_parallel = tp;
    auto backend = engine::cpu::MakeCpuBackend(opts);
    ASSERT_TRUE(backend->Load(model_.config, *model_.weights, engine::Shard{}).ok());
    auto eng = MakeEngine(backend.get());
    runs.push_back(testing::RunRequest(*eng, RagRequest(spec, 8)));
    ASSERT_TRUE(runs.back().status.ok()) << runs.back().status;
    eng->Shutdown(absl::ZeroDuration());
  }
  EXPECT_EQ(runs[0].tokens, runs[1].tokens);
  for (size_t i = 0; i < spec.documents.size(); ++i) {
    EXPECT_NEAR(runs[0].rag->docs[i].score, runs[1].rag->docs[i].score, 1e-4);
    EXPECT_EQ(runs[0].rag->docs[i].kept, runs[1].rag->docs[i].kept);
  }
}

TEST_F(RagEngineTest, BadInputIsRejected) {
  auto cpu = MakeBackend();
  auto eng = MakeEngine(cpu.get());
  Spec s = MakeSpec(3, false);
  s.documents.clear();
  EXPECT_EQ(testing::RunRequest(*eng, RagRequest(s)).status.code(),
            absl::StatusCode::kInvalidArgument);
  s = MakeSpec(3, false);
  s.options.top_k = 4;
  EXPECT_EQ(testing::RunRequest(*eng, RagRequest(s)).status.code(),
            absl::StatusCode::kInvalidArgument);
  s.options.top_k = 0;
  EXPECT_EQ(testing::RunRequest(*eng, RagRequest(s)).status.code(),
            absl::StatusCode::kInvalidArgument);
  s = MakeSpec(3, false);
  s.documents[1].assign(600, 5);  // longer than the 512-token context
  EXPECT_EQ(testing::RunRequest(*eng, RagRequest(s)).status.code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace superpose
