#include "cuda/step_meta.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace superpose::cuda {

absl::StatusOr<StepMeta> BuildStepMeta(const engine::BatchPlan& plan, int32_t block_size,
                                       int32_t max_tile_tokens) {
  if (block_size <= 0 || max_tile_tokens <= 0) {
    return absl::InvalidArgumentError("BuildStepMeta: bad block size or tile size");
  }
  const int32_t T = plan.num_tokens();
  const int32_t bs = block_size;
  StepMeta m;
  std::vector<int32_t>& w = m.words;
  w.reserve(static_cast<size_t>(T) * 4 + 64);
  w.insert(w.end(), plan.tokens.begin(), plan.tokens.end());
  m.off_pos = w.size();
  w.resize(w.size() + T);
  static_assert(sizeof(float) == sizeof(int32_t), "positions are stored as int32 words");
  if (T > 0) std::memcpy(w.data() + m.off_pos, plan.positions.data(), sizeof(float) * T);
  m.off_slots = w.size();
  for (const engine::KvSlot& s : plan.kv_slots) w.push_back(s.block * bs + s.slot);

  bool all_single = true;
  for (const engine::SeqPlan& seq : plan.seqs) all_single = all_single && seq.num_tokens <= 1;
  m.tile_tokens = all_single ? 1 : max_tile_tokens;
  m.off_keys = w.size();
  std::vector<AttnTile> tiles;
  for (const engine::SeqPlan& seq : plan.seqs) {
    if (seq.num_tokens == 0) continue;
    const int64_t key_off = static_cast<int64_t>(w.size() - m.off_keys);
    for (const engine::KvSegment& g : seq.context) {
      for (int32_t s = 0; s < g.length; ++s) w.push_back(g.block * bs + g.first_slot + s);
    }
    const int64_t ctx_len = static_cast<int64_t>(w.size() - m.off_keys) - key_off;
    for (int32_t j = 0; j < seq.num_tokens; ++j) {
      const engine::KvSlot& s = plan.kv_slots[seq.token_begin + j];
      w.push_back(s.block * bs + s.slot);
    }
    if (key_off + ctx_len + seq.num_tokens > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError("plan: too many keys in one step");
    }
    for (int32_t i0 = 0; i0 < seq.num_tokens; i0 += m.tile_tokens) {
      tiles.push_back(AttnTile{static_cast<int32_t>(key_off), static_cast<int32_t>(ctx_len),
                               seq.token_begin + i0, i0,
                               std::min(m.tile_tokens, seq.num_tokens - i0)});
    }
  }
  m.num_tiles = static_cast<int32_t>(tiles.size());
  m.off_tiles = w.size();
  w.resize(w.size() + tiles.size() * 5);
  if (!tiles.empty())
    std::memcpy(w.data() + m.off_tiles, tiles.data(), tiles.size() * sizeof(AttnTile));

  m.rows = plan.logits_for;
  std::vector<int32_t> lp_row(plan.logprobs.size()), lp_target(plan.logprobs.size());
  for (size_t i = 0; i < plan.logprobs.size(); ++i) {
    const int32_t t = plan.logprobs[i].token_index;
    auto it = std::find(m.rows.begin(), m.rows.end(), t);
    if (it == m.rows.end()) {
      m.rows.push_back(t);
      it = m.rows.end() - 1;
    }
    lp_row[i] = static_cast<int32_t>(it - m.rows.begin());
    lp_target[i] = plan.logprobs[i].target;
  }
  m.num_logprobs = static_cast<int32_t>(lp_row.size());
  m.off_rows = w.size();
  w.insert(w.end(), m.rows.begin(), m.rows.end());
  m.off_lp_row = w.size();
  w.insert(w.end(), lp_row.begin(), lp_row.end());
  m.off_lp_target = w.size();
  w.insert(w.end(), lp_target.begin(), lp_target.end());
  return m;
}

size_t DecodeMetaWords(const StepMeta& m, int32_t T) {
  return DecodeMetaLayout(T).off_keys + (m.off_tiles - m.off_keys);
}

absl::Status PackDecodeMeta(const StepMeta& m, int32_t T, int32_t* dst) {
  if (T <= 0 || m.tile_tokens != 1 || m.num_tiles != T || m.off_pos != static_cast<size_t>(T) ||
      m.off_slots != 2 * static_cast<size_t>(T) || m.off_keys != 3 * static_cast<size_t>(T) ||
      m.off_rows != m.off_tiles + 5 * static_cast<size_t>(T) || m.words.size() < m.off_rows) {
    return absl::InvalidArgumentError("PackDecodeMeta: not a decode step of T tokens");
  }
  const DecodeLayout l = DecodeMetaLayout(T);
  const int32_t* w = m.words.data();
  // tokens, positions and slots keep their places (offsets 0, T, 2T in both layouts).
  std::memcpy(dst, w, sizeof(int32_t) * 3 * static_cast<size_t>(T));
  std::memcpy(dst + l.off_tiles, w + m.off_tiles, sizeof(int32_t) * 5 * static_cast<size_t>(T));
  const size_t keys = m.off_tiles - m.off_keys;
  if (keys > 0) std::memcpy(dst + l.off_keys, w + m.off_keys, sizeof(int32_t) * keys);
  return absl::OkStatus();
}

}  // namespace superpose::cuda
