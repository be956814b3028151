// The host side of a CUDA step (cuda/step_meta.h): key lists and attention tiles built
// from a BatchPlan give every token exactly the keys the CPU backend attends to. Runs
// without a GPU (skips only in builds without the CUDA backend).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "engine/backend.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/step_meta.h"
#endif

namespace superpose {
namespace {

#if SUPERPOSE_HAVE_CUDA

// Seq 1: context of two segments (block 0 all 16, block 1 slots 2..6), 5 new tokens;
// seq 2: 1 new token, no context; seq 3: no new tokens; seq 4: context block 0 slots
// 0..7 (shared prefix), 37 new tokens across blocks 5..7.
engine::BatchPlan MixedPlan() {
  engine::BatchPlan p;
  auto add_seq = [&](int64_t id, std::vector<engine::KvSegment> ctx,
                     std::vector<engine::KvSlot> slots) {
    engine::SeqPlan s;
    s.id = id;
    s.context = std::move(ctx);
    s.token_begin = p.num_tokens();
    s.num_tokens = static_cast<int32_t>(slots.size());
    for (const engine::KvSlot& sl : slots) {
      p.tokens.push_back(static_cast<int32_t>(p.tokens.size()) + 3);
      p.positions.push_back(0.5f + static_cast<float>(p.positions.size()));
      p.kv_slots.push_back(sl);
    }
    p.seqs.push_back(s);
  };
  add_seq(1, {{0, 0, 16}, {1, 2, 5}}, {{1, 7}, {1, 8}, {1, 9}, {2, 0}, {2, 1}});
  add_seq(2, {}, {{3, 4}});
  add_seq(3, {{4, 0, 3}}, {});
  std::vector<engine::KvSlot> long_slots;
  for (int32_t i = 0; i < 37; ++i) long_slots.push_back({5 + i / 16, i % 16});
  add_seq(4, {{0, 0, 8}}, long_slots);
  p.logits_for = {4, 5, 42, 0};
  p.logprobs = {{5, 1}, {1, 2}, {1, 3}, {42, 4}};
  return p;
}

// The CPU backend's key list of each token: its sequence's context, then the new
// tokens of the sequence up to and including itself.
std::vector<std::vector<int32_t>> ExpectedKeys(const engine::BatchPlan& p, int32_t bs) {
  std::vector<std::vector<int32_t>> keys(p.num_tokens());
  for (const engine::SeqPlan& s : p.seqs) {
    std::vector<int32_t> ctx;
    for (const engine::KvSegment& g : s.context) {
      for (int32_t i = 0; i < g.length; ++i) ctx.push_back(g.block * bs + g.first_slot + i);
    }
    for (int32_t j = 0; j < s.num_tokens; ++j) {
      const engine::KvSlot& sl = p.kv_slots[s.token_begin + j];
      ctx.push_back(sl.block * bs + sl.slot);
      keys[s.token_begin + j] = ctx;
    }
  }
  return keys;
}

void CheckMeta(const engine::BatchPlan& p, int32_t bs, int32_t max_tile) {
  ASSERT_TRUE(engine::ValidatePlan(p, engine::KvPoolInfo{16, bs, 0, "float32"}, 1000).ok());
  absl::StatusOr<cuda::StepMeta> m = cuda::BuildStepMeta(p, bs, max_tile);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<int32_t>& w = m->words;
  const int32_t T = p.num_tokens();
  for (int32_t t = 0; t < T; ++t) {
    EXPECT_EQ(w[t], p.tokens[t]);
    float pos;
    std::memcpy(&pos, &w[m->off_pos + t], sizeof(float));
    EXPECT_EQ(pos, p.positions[t]);
    EXPECT_EQ(w[m->off_slots + t], p.kv_slots[t].block * bs + p.kv_slots[t].slot);
  }
  const auto want = ExpectedKeys(p, bs);
  std::vector<int> covered(T, 0);
  const int32_t* keys = &w[m->off_keys];
  for (int32_t i = 0; i < m->num_tiles; ++i) {
    cuda::AttnTile tile;
    std::memcpy(&tile, &w[m->off_tiles + 5 * i], sizeof(tile));
    ASSERT_GE(tile.ntok, 1);
    ASSERT_LE(tile.ntok, m->tile_tokens);
    for (int32_t k = 0; k < tile.ntok; ++k) {
      const int32_t t = tile.tok0 + k;
      ASSERT_LT(t, T);
      ++covered[t];
      const int32_t visible = tile.ctx_len + tile.i0 + k + 1;  // as the kernel computes it
      std::vector<int32_t> got(keys + tile.key_off, keys + tile.key_off + visible);
      EXPECT_EQ(got, want[t]) << "token " << t;
    }
  }
  for (int32_t t = 0; t < T; ++t) EXPECT_EQ(covered[t], 1) << "token " << t;
  // Rows: logits_for, then the logprob rows not among them; logprob rows index `rows`.
  std::vector<int32_t> rows = p.logits_for;
  for (const auto& lp : p.logprobs) {
    if (std::find(rows.begin(), rows.end(), lp.token_index) == rows.end()) {
      rows.push_back(lp.token_index);
    }
  }
  EXPECT_EQ(m->rows, rows);
  ASSERT_EQ(m->num_logprobs, static_cast<int32_t>(p.logprobs.size()));
  for (size_t i = 0; i < p.logprobs.size(); ++i) {
    EXPECT_EQ(m->rows[w[m->off_lp_row + i]], p.logprobs[i].token_index);
    EXPECT_EQ(w[m->off_lp_target + i], p.logprobs[i].target);
  }
  EXPECT_EQ(w.size(), m->off_lp_target + p.logprobs.size());
}

TEST(CudaStepMetaTest, KeysAndTilesMatchTheCpuSemantics) {
  const engine::BatchPlan p = MixedPlan();
  for (int32_t tile : {1, 4, 16}) {
    SCOPED_TRACE("tile " + std::to_string(tile));
    CheckMeta(p, 16, tile);
    absl::StatusOr<cuda::StepMeta> m = cuda::BuildStepMeta(p, 16, tile);
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->tile_tokens, tile);  // the plan has prefill chunks
  }
}

TEST(CudaStepMetaTest, DecodeStepsUseOneTokenTiles) {
  engine::BatchPlan p;
  for (int32_t s = 0; s < 3; ++s) {
    engine::SeqPlan sp;
    sp.id = s;
    sp.context = {{s, 0, 16}, {10 + s, 0, 3}};
    sp.token_begin = s;
    sp.num_tokens = 1;
    p.seqs.push_back(sp);
    p.tokens.push_back(7);
    p.positions.push_back(19.0f);
    p.kv_slots.push_back({10 + s, 3});
    p.logits_for.push_back(s);
  }
  // ValidatePlan in CheckMeta uses a pool of 16 blocks.
  CheckMeta(p, 16, 16);
  absl::StatusOr<cuda::StepMeta> m = cuda::BuildStepMeta(p, 16, 16);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->tile_tokens, 1);
  EXPECT_EQ(m->num_tiles, 3);
}

TEST(CudaStepMetaTest, BadSizesAreRejected) {
  EXPECT_FALSE(cuda::BuildStepMeta(engine::BatchPlan{}, 0, 4).ok());
  EXPECT_FALSE(cuda::BuildStepMeta(engine::BatchPlan{}, 16, 0).ok());
}

#else

TEST(CudaStepMetaTest, BuiltWithoutCuda) { GTEST_SKIP() << "built without the CUDA backend"; }

#endif

}  // namespace
}  // namespace superpose
