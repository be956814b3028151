// The CUDA paged-attention kernel's body (cuda/attention_body.h), run on CPU threads:
// one std::thread per CUDA thread of a block (128), a barrier for __syncthreads, float
// K/V. Checks its key indexing, causal masking, GQA head mapping, tiling and online
// softmax against a double-precision reference on any machine; the GPU test
// (cuda_backend_test) checks the same kernel on a device with bf16 K/V.
#include <gtest/gtest.h>

#include <cmath>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "cuda/attention_body.h"

namespace superpose {
namespace {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  int arrived_ = 0;
  int64_t gen_ = 0;
};

struct HostCtx {
  int t, n;
  Barrier* barrier;
  int tid() const { return t; }
  int nthreads() const { return n; }
  void sync() const { barrier->Wait(); }
  float load(const float* p, int64_t i) const { return p[i]; }
  void store(float* p, int64_t i, float v) const { p[i] = v; }
};

// Runs the kernel's grid (num_tiles x kvh blocks of kAttnThreads threads) on the CPU.
void EmulateAttention(const std::vector<float>& q, const std::vector<float>& kpool,
                      const std::vector<float>& vpool, const std::vector<int32_t>& keys,
                      const std::vector<cuda::AttnTile>& tiles, int32_t max_tile_tokens, int32_t qh,
                      int32_t kvh, int32_t D, float scale, std::vector<float>* out) {
  const int32_t G = qh / kvh;
  // Poison shared memory with NaN: a value read before it is written shows up.
  std::vector<float> smem(cuda::AttentionSharedFloats(max_tile_tokens * G, D));
  const int n = cuda::kAttnThreads;
  for (size_t i = 0; i < tiles.size(); ++i) {
    for (int32_t g = 0; g < kvh; ++g) {
      std::fill(smem.begin(), smem.end(), std::nanf(""));
      Barrier barrier(n);
      std::vector<std::thread> threads;
      for (int t = 0; t < n; ++t) {
        threads.emplace_back([&, t] {
          HostCtx c{t, n, &barrier};
          cuda::AttentionBlock(c, tiles[i], g, smem.data(), q.data(), kpool.data(), vpool.data(),
                               keys.data(), qh, kvh, D, G, scale, out->data());
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}

std::vector<float> Uniform(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Three sequences over a pool of 12 blocks of 16 slots: seq 0 has a context of block 0
// (16) + block 1 (14) and 5 new tokens crossing into block 2; seq 1 shares block 0 and
// has a segment of block 5 (slots 4..9) and 1 new token; seq 2 has no context and 40
// new tokens (more than one key tile) in blocks 6..8.
void Check(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens) {
  const int32_t bs = 16, num_blocks = 12, G = qh / kvh;
  const auto kpool = Uniform(static_cast<size_t>(num_blocks) * bs * kvh * D, 1);
  const auto vpool = Uniform(kpool.size(), 2);
  std::vector<std::vector<int32_t>> keys(3), news(3);
  for (int32_t s = 0; s < 16; ++s) keys[0].push_back(s);
  for (int32_t s = 0; s < 14; ++s) keys[0].push_back(bs + s);
  news[0] = {bs + 14, bs + 15, 2 * bs, 2 * bs + 1, 2 * bs + 2};
  for (int32_t s = 0; s < 16; ++s) keys[1].push_back(s);
  for (int32_t s = 4; s < 10; ++s) keys[1].push_back(5 * bs + s);
  news[1] = {9 * bs + 3};
  for (int32_t i = 0; i < 40; ++i) news[2].push_back(6 * bs + i);
  std::vector<int32_t> flat, ctx_len(3), seq_of, idx_in_seq;
  std::vector<cuda::AttnTile> tiles;
  int32_t tok = 0;
  for (int32_t s = 0; s < 3; ++s) {
    ctx_len[s] = static_cast<int32_t>(keys[s].size());
    keys[s].insert(keys[s].end(), news[s].begin(), news[s].end());
    const int32_t key_off = static_cast<int32_t>(flat.size());
    flat.insert(flat.end(), keys[s].begin(), keys[s].end());
    const int32_t n = static_cast<int32_t>(news[s].size());
    for (int32_t i0 = 0; i0 < n; i0 += tile_tokens) {
      tiles.push_back({key_off, ctx_len[s], tok + i0, i0, std::min(tile_tokens, n - i0)});
    }
    for (int32_t i = 0; i < n; ++i) {
      seq_of.push_back(s);
      idx_in_seq.push_back(i);
    }
    tok += n;
  }
  const int32_t T = tok;
  const auto q = Uniform(static_cast<size_t>(T) * qh * D, 3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> out(static_cast<size_t>(T) * qh * D, std::nanf(""));
  EmulateAttention(q, kpool, vpool, flat, tiles, tile_tokens, qh, kvh, D, scale, &out);
  for (int32_t t = 0; t < T; ++t) {
    const int32_t s = seq_of[t];
    const int32_t nk = ctx_len[s] + idx_in_seq[t] + 1;
    for (int32_t h = 0; h < qh; ++h) {
      const int32_t g = h / G;
      std::vector<double> sc(nk);
      double mx = -1e300;
      for (int32_t k = 0; k < nk; ++k) {
        double dot = 0;
        for (int32_t d = 0; d < D; ++d) {
          dot += static_cast<double>(q[(static_cast<size_t>(t) * qh + h) * D + d]) *
                 kpool[(static_cast<size_t>(keys[s][k]) * kvh + g) * D + d];
        }
        sc[k] = dot * scale;
        mx = std::max(mx, sc[k]);
      }
      double sum = 0;
      for (double& v : sc) sum += (v = std::exp(v - mx));
      for (int32_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int32_t k = 0; k < nk; ++k) {
          acc += sc[k] * vpool[(static_cast<size_t>(keys[s][k]) * kvh + g) * D + d];
        }
        ASSERT_NEAR(out[(static_cast<size_t>(t) * qh + h) * D + d], acc / sum, 2e-5)
            << "qh " << qh << " kvh " << kvh << " D " << D << " tile " << tile_tokens << " t " << t
            << " h " << h << " d " << d;
      }
    }
  }
}

TEST(AttentionEmulationTest, MatchesReferenceOnCpuThreads) {
  for (int32_t tile : {1, 4, 16}) {
    Check(8, 4, 8, tile);   // stories260k: GQA 2, head_dim 8
    Check(8, 2, 64, tile);  // GQA 4
    Check(4, 4, 32, tile);  // MHA
  }
}

}  // namespace
}  // namespace superpose
