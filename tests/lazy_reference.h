// A dense reference of LazyLLM for the tests, written independently of the backends in
// plain loops (double precision): a Llama forward where token i is computed by layer l
// only while it is in l's stage, causal attention over the tokens present at l, and the
// pruning decision (last token's attention averaged over the query heads, top-k with
// ties to the lower position) taken from that same dense computation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/config.h"
#include "engine/model/weights.h"

namespace superpose::testing {

class LazyReference {
 public:
  LazyReference(const engine::ModelConfig& c, const engine::WeightSource& w) : c_(c), w_(w) {}

  struct Result {
    std::vector<double> logits;  // of the last token
    std::vector<int32_t> depth;  // per token: stages it was computed in
    std::vector<int32_t> layer_tokens;
    // Per boundary where it decides: each token's score there (0: not in the stage).
    std::vector<std::vector<double>> scores;
  };

  // `depth` empty: decide with `keep`; else replay it (keep unused). The first `fixed`
  // tokens (a cached prefix) are in every stage: never candidates.
  Result Run(const std::vector<int32_t>& tokens, const std::vector<int32_t>& boundaries,
             const std::vector<float>& keep, std::vector<int32_t> depth = {},
             int32_t fixed = 0) const {
    const int32_t n = static_cast<int32_t>(tokens.size()), H = c_.hidden_size;
    const int32_t S = static_cast<int32_t>(boundaries.size()) + 1;
    const bool decide = depth.empty();
    if (decide) depth.assign(n, S);
    Result r;
    std::vector<std::vector<double>> x(n, std::vector<double>(H));
    const std::vector<float> emb = Get("model.embed_tokens.weight");
    for (int32_t i = 0; i < n; ++i) {
      for (int32_t e = 0; e < H; ++e) x[i][e] = emb[static_cast<size_t>(tokens[i]) * H + e];
    }
    for (int32_t l = 0; l < c_.num_layers; ++l) {
      const int32_t stage = static_cast<int32_t>(
          std::lower_bound(boundaries.begin(), boundaries.end(), l) - boundaries.begin());
      std::vector<int32_t> present;
      for (int32_t i = 0; i < n; ++i) {
        if (depth[i] > stage) present.push_back(i);
      }
      r.layer_tokens.push_back(static_cast<int32_t>(present.size()));
      const bool boundary = stage < S - 1 && boundaries[stage] == l;
      std::vector<double> score(n, 0.0);
      Layer(l, present, &x, boundary && decide ? &score : nullptr);
      if (boundary && decide) {
        Prune(present, score, keep[stage], stage, fixed, &depth);
        r.scores.push_back(score);
      }
    }
    r.depth = depth;
    r.logits = Logits(x[n - 1]);
    return r;
  }

 private:
  std::vector<float> Get(const std::string& name) const {
    engine::TensorView t = *w_.Get(name);
    std::vector<float> v(t.numel());
    std::memcpy(v.data(), t.data, v.size() * sizeof(float));
    return v;
  }
  std::vector<float> Get(int32_t l, const std::string& name) const {
    return Get(absl::StrCat("model.layers.", l, ".", name));
  }
  static std::vector<double> MatVec(const std::vector<float>& w, const std::vector<double>& x,
                                    int32_t out) {
    std::vector<double> y(out, 0.0);
    const size_t in = x.size();
    for (int32_t o = 0; o < out; ++o) {
      for (size_t i = 0; i < in; ++i) y[o] += w[o * in + i] * x[i];
    }
    return y;
  }
  std::vector<double> Norm(const std::vector<double>& x, const std::vector<float>& w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / x.size() + c_.rms_norm_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * w[i];
    return y;
  }
  void Rope(double* v, int32_t pos) const {
    const int32_t D = c_.head_dim, half = D / 2;
    const std::vector<float> inv = engine::RopeInvFreq(c_);
    for (int32_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(static_cast<float>(pos) * inv[i]);
      const double x0 = v[i], x1 = v[i + half];
      v[i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[i + half] = x1 * std::cos(a) + x0 * std::sin(a);
    }
  }

  // One layer over the present tokens; `score`: the last one's head-averaged attention.
  void Layer(int32_t l, const std::vector<int32_t>& present, std::vector<std::vector<double>>* xs,
             std::vector<double>* score) const {
    const int32_t D = c_.head_dim, Hq = c_.num_heads, Hk = c_.num_kv_heads, H = c_.hidden_size;
    const std::vector<float> wq = Get(l, "self_attn.q_proj.weight"),
                             wk = Get(l, "self_attn.k_proj.weight"),
                             wv = Get(l, "self_attn.v_proj.weight"),
                             wo = Get(l, "self_attn.o_proj.weight"),
                             n1 = Get(l, "input_layernorm.weight");
    std::vector<double> bq, bk, bv;
    if (c_.attention_bias) {
      for (auto [b, name] : {std::pair{&bq, "q"}, {&bk, "k"}, {&bv, "v"}}) {
        const std::vector<float> f = Get(l, absl::StrCat("self_attn.", name, "_proj.bias"));
        b->assign(f.begin(), f.end());
      }
    }
    const size_t P = present.size();
    std::vector<std::vector<double>> q(P), k(P), v(P);
    for (size_t a = 0; a < P; ++a) {
      const std::vector<double> h = Norm((*xs)[present[a]], n1);
      q[a] = MatVec(wq, h, Hq * D);
      k[a] = MatVec(wk, h, Hk * D);
      v[a] = MatVec(wv, h, Hk * D);
      for (size_t i = 0; i < bq.size(); ++i) q[a][i] += bq[i];
      for (size_t i = 0; i < bk.size(); ++i) k[a][i] += bk[i], v[a][i] += bv[i];
      for (int32_t hh = 0; hh < Hq; ++hh) Rope(&q[a][hh * D], present[a]);
      for (int32_t hh = 0; hh < Hk; ++hh) Rope(&k[a][hh * D], present[a]);
    }
    std::vector<std::vector<double>> attn(P, std::vector<double>(Hq * D, 0.0));
    for (size_t a = 0; a < P; ++a) {
      for (int32_t hh = 0; hh < Hq; ++hh) {
        const int32_t kh = hh / (Hq / Hk);
        std::vector<double> p(a + 1);
        double mx = -1e300, sum = 0;
        for (size_t b = 0; b <= a; ++b) {
          double s = 0;
          for (int32_t d = 0; d < D; ++d) s += q[a][hh * D + d] * k[b][kh * D + d];
          p[b] = s / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, p[b]);
        }
        for (double& e : p) sum += (e = std::exp(e - mx));
        for (size_t b = 0; b <= a; ++b) {
          p[b] /= sum;
          for (int32_t d = 0; d < D; ++d) attn[a][hh * D + d] += p[b] * v[b][kh * D + d];
          if (score != nullptr && a + 1 == P) (*score)[present[b]] += p[b] / Hq;
        }
      }
    }
    for (size_t a = 0; a < P; ++a) {
      std::vector<double>& x = (*xs)[present[a]];
      const std::vector<double> o = MatVec(wo, attn[a], H);
      for (int32_t e = 0; e < H; ++e) x[e] += o[e];
      Mlp(l, &x);
    }
  }

  void Mlp(int32_t l, std::vector<double>* x) const {
    const int32_t I = c_.intermediate_size, H = c_.hidden_size;
    const std::vector<double> h = Norm(*x, Get(l, "post_attention_layernorm.weight"));
    const std::vector<double> g = MatVec(Get(l, "mlp.gate_proj.weight"), h, I);
    std::vector<double> u = MatVec(Get(l, "mlp.up_proj.weight"), h, I);
    for (int32_t i = 0; i < I; ++i) u[i] *= g[i] / (1.0 + std::exp(-g[i]));
    const std::vector<double> d = MatVec(Get(l, "mlp.down_proj.weight"), u, H);
    for (int32_t e = 0; e < H; ++e) (*x)[e] += d[e];
  }

  static void Prune(const std::vector<int32_t>& present, const std::vector<double>& score,
                    float keep, int32_t stage, int32_t fixed, std::vector<int32_t>* depth) {
    std::vector<int32_t> cand;
    for (size_t a = 0; a + 1 < present.size(); ++a) {
      if (present[a] >= fixed) cand.push_back(present[a]);
    }
    const int32_t k = static_cast<int32_t>(std::llround(static_cast<double>(keep) * cand.size()));
    std::stable_sort(cand.begin(), cand.end(),
                     [&](int32_t a, int32_t b) { return score[a] > score[b]; });
    for (size_t j = k; j < cand.size(); ++j) (*depth)[cand[j]] = stage + 1;
  }

  std::vector<double> Logits(const std::vector<double>& x) const {
    const std::vector<double> h = Norm(x, Get("model.norm.weight"));
    const bool tied = !w_.Has("lm_head.weight");
    return MatVec(Get(tied ? "model.embed_tokens.weight" : "lm_head.weight"), h, c_.vocab_size);
  }

  const engine::ModelConfig& c_;
  const engine::WeightSource& w_;
};

}  // namespace superpose::testing
