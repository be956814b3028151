// A paged-attention test case shared by the CPU emulation of the CUDA attention kernel
// and the GPU test: three sequences over a pool of 12 blocks of 16 slots. Seq 0 has a
// context of block 0 (16) + block 1 (14) and 5 new tokens crossing into block 2; seq 1
// shares block 0 and has a segment of block 5 (slots 4..9) and 1 new token; seq 2 has
// no context and 40 new tokens (more than one key tile) in blocks 6..8. Plus the
// double-precision reference every output is checked against.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/attn_tile.h"

namespace superpose::testing {

struct AttentionCase {
  int32_t qh = 0, kvh = 0, D = 0, T = 0;
  float scale = 0;
  std::vector<float> kpool, vpool, q;      // pools [slot][kvh][D], q [T][qh][D]
  std::vector<std::vector<int32_t>> keys;  // per sequence: context slots then new slots
  std::vector<int32_t> flat, ctx_len, seq_of, idx_in_seq;
  std::vector<cuda::AttnTile> tiles;
};

// `random(n, seed)`: n non-zero floats.
inline AttentionCase MakeAttentionCase(
    int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens,
    const std::function<std::vector<float>(size_t, uint32_t)>& random) {
  constexpr int32_t bs = 16, num_blocks = 12;
  AttentionCase c;
  c.qh = qh;
  c.kvh = kvh;
  c.D = D;
  c.kpool = random(static_cast<size_t>(num_blocks) * bs * kvh * D, 1);
  c.vpool = random(c.kpool.size(), 2);
  std::vector<std::vector<int32_t>> news(3);
  c.keys.resize(3);
  for (int32_t s = 0; s < 16; ++s) c.keys[0].push_back(s);
  for (int32_t s = 0; s < 14; ++s) c.keys[0].push_back(bs + s);
  news[0] = {bs + 14, bs + 15, 2 * bs, 2 * bs + 1, 2 * bs + 2};
  for (int32_t s = 0; s < 16; ++s) c.keys[1].push_back(s);
  for (int32_t s = 4; s < 10; ++s) c.keys[1].push_back(5 * bs + s);
  news[1] = {9 * bs + 3};
  for (int32_t i = 0; i < 40; ++i) news[2].push_back(6 * bs + i);
  c.ctx_len.resize(3);
  int32_t tok = 0;
  for (int32_t s = 0; s < 3; ++s) {
    c.ctx_len[s] = static_cast<int32_t>(c.keys[s].size());
    c.keys[s].insert(c.keys[s].end(), news[s].begin(), news[s].end());
    const int32_t key_off = static_cast<int32_t>(c.flat.size());
    c.flat.insert(c.flat.end(), c.keys[s].begin(), c.keys[s].end());
    const int32_t n = static_cast<int32_t>(news[s].size());
    for (int32_t i0 = 0; i0 < n; i0 += tile_tokens) {
      c.tiles.push_back({key_off, c.ctx_len[s], tok + i0, i0, std::min(tile_tokens, n - i0)});
    }
    for (int32_t i = 0; i < n; ++i) {
      c.seq_of.push_back(s);
      c.idx_in_seq.push_back(i);
    }
    tok += n;
  }
  c.T = tok;
  c.q = random(static_cast<size_t>(c.T) * qh * D, 3);
  c.scale = 1.0f / std::sqrt(static_cast<float>(D));
  return c;
}

// Sequences of (context, new tokens) over a pool holding exactly their keys, in a
// shuffled slot order; tiles of `tile_tokens`. `random(n, seed)`: n non-zero floats.
inline AttentionCase MakeSeqsCase(
    int32_t qh, int32_t kvh, int32_t D, int32_t tile_tokens,
    const std::vector<std::pair<int32_t, int32_t>>& seqs, uint32_t seed,
    const std::function<std::vector<float>(size_t, uint32_t)>& random) {
  AttentionCase c;
  c.qh = qh;
  c.kvh = kvh;
  c.D = D;
  int32_t total = 0;
  for (const auto& s : seqs) total += s.first + s.second;
  std::vector<int32_t> slots(total);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(seed));
  c.kpool = random(static_cast<size_t>(total) * kvh * D, seed + 1);
  c.vpool = random(c.kpool.size(), seed + 2);
  int32_t next = 0;
  for (int32_t s = 0; s < static_cast<int32_t>(seqs.size()); ++s) {
    const int32_t ctx = seqs[s].first, n = seqs[s].second;
    c.keys.emplace_back(slots.begin() + next, slots.begin() + next + ctx + n);
    next += ctx + n;
    c.ctx_len.push_back(ctx);
    const int32_t key_off = static_cast<int32_t>(c.flat.size());
    c.flat.insert(c.flat.end(), c.keys[s].begin(), c.keys[s].end());
    for (int32_t i0 = 0; i0 < n; i0 += tile_tokens) {
      c.tiles.push_back({key_off, ctx, c.T + i0, i0, std::min(tile_tokens, n - i0)});
    }
    for (int32_t i = 0; i < n; ++i) {
      c.seq_of.push_back(s);
      c.idx_in_seq.push_back(i);
    }
    c.T += n;
  }
  c.q = random(static_cast<size_t>(c.T) * qh * D, seed + 3);
  c.scale = 1.0f / std::sqrt(static_cast<float>(D));
  return c;
}

// Every output element against causal softmax attention in double precision.
inline void ExpectMatchesReference(const AttentionCase& c, const std::vector<float>& out,
                                   double tol, const std::string& what) {
  const int32_t G = c.qh / c.kvh, D = c.D;
  ASSERT_EQ(out.size(), static_cast<size_t>(c.T) * c.qh * D);
  for (int32_t t = 0; t < c.T; ++t) {
    const int32_t s = c.seq_of[t];
    const int32_t nk = c.ctx_len[s] + c.idx_in_seq[t] + 1;
    for (int32_t h = 0; h < c.qh; ++h) {
      const int32_t g = h / G;
      std::vector<double> sc(nk);
      double mx = -1e300;
      for (int32_t k = 0; k < nk; ++k) {
        double dot = 0;
        for (int32_t d = 0; d < D; ++d) {
          dot += static_cast<double>(c.q[(static_cast<size_t>(t) * c.qh + h) * D + d]) *
                 c.kpool[(static_cast<size_t>(c.keys[s][k]) * c.kvh + g) * D + d];
        }
        sc[k] = dot * c.scale;
        mx = std::max(mx, sc[k]);
      }
      double sum = 0;
      for (double& v : sc) sum += (v = std::exp(v - mx));
      for (int32_t d = 0; d < D; ++d) {
        double acc = 0;
        for (int32_t k = 0; k < nk; ++k) {
          acc += sc[k] * c.vpool[(static_cast<size_t>(c.keys[s][k]) * c.kvh + g) * D + d];
        }
        ASSERT_NEAR(out[(static_cast<size_t>(t) * c.qh + h) * D + d], acc / sum, tol)
            << what << ": qh " << c.qh << " kvh " << c.kvh << " D " << D << " t " << t << " h " << h
            << " d " << d;
      }
    }
  }
}

}  // namespace superpose::testing
