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
#include "tests/attention_case.h"

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

void Check(int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens) {
  const testing::AttentionCase c = testing::MakeAttentionCase(qh, kvh, D, tile_tokens, Uniform);
  std::vector<float> out(static_cast<size_t>(c.T) * qh * D, std::nanf(""));
  EmulateAttention(c.q, c.kpool, c.vpool, c.flat, c.tiles, tile_tokens, qh, kvh, D, c.scale, &out);
  testing::ExpectMatchesReference(c, out, 2e-5, "tile " + std::to_string(tile_tokens));
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
