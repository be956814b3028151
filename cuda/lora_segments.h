// The host side of the segmented LoRA kernels (cuda/lora_body.h): a step's segment
// table, appended to its metadata words (cuda/step_meta.h) so that it is uploaded with
// them. No CUDA includes: the emulation test builds tables with it on any machine.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <vector>

#include "cuda/lora_body.h"

namespace superpose::cuda {

// One sequence of a step: rows [begin, begin + count) and its adapter's device
// descriptors ([layer][site][slot] LoraDesc), null without an adapter.
struct LoraSeqRows {
  int32_t begin = 0, count = 0;
  const void* descs = nullptr;
};

// Appends the segments of `seqs` (in plan order) to `words` and returns how many: rows
// of consecutive sequences with the same adapter are joined, and cut into segments of
// at most kLoraSegmentRows rows; rows without an adapter have none.
inline int32_t AppendLoraSegments(const std::vector<LoraSeqRows>& seqs,
                                  std::vector<int32_t>* words) {
  const size_t first = words->size();
  int32_t n = 0;
  for (const LoraSeqRows& s : seqs) {
    if (s.descs == nullptr) continue;
    const uint64_t bits = reinterpret_cast<uintptr_t>(s.descs);
    const int32_t lo = static_cast<int32_t>(static_cast<uint32_t>(bits));
    const int32_t hi = static_cast<int32_t>(static_cast<uint32_t>(bits >> 32));
    for (int32_t r = s.begin; r < s.begin + s.count;) {
      int32_t* last = n > 0 ? words->data() + first + (n - 1) * kLoraSegmentWords : nullptr;
      if (last != nullptr && last[1] == r && last[2] == lo && last[3] == hi &&
          last[1] - last[0] < kLoraSegmentRows) {
        const int32_t take =
            std::min(kLoraSegmentRows - (last[1] - last[0]), s.begin + s.count - r);
        last[1] += take;
        r += take;
        continue;
      }
      const int32_t end = std::min(r + kLoraSegmentRows, s.begin + s.count);
      words->insert(words->end(), {r, end, lo, hi});
      ++n;
      r = end;
    }
  }
  return n;
}

}  // namespace superpose::cuda
