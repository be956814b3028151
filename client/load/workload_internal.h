// Pieces shared by the workloads (workload.cc, jsonl.cc).
#pragma once

#include <random>
#include <string>
#include <vector>

#include "client/load/workload.h"

namespace superpose::load::internal {

// The generator of request `index`: independent of the other requests.
std::mt19937_64 RequestRng(uint64_t seed, uint64_t index);

// Greedy/sampling settings of every request, with `max_new_tokens`.
void SetSampling(const Settings& s, uint64_t seed, int max_new_tokens,
                 superpose::v1::SamplingParams* p);

// The auto affinity key of a token id prefix (its first --affinity_prefix_tokens ids).
std::string PrefixAffinity(const Settings& s, const std::vector<uint32_t>& ids);

// The affinity header of a request: --affinity=key:V gives V, none gives "", auto `automatic`.
std::string ChooseAffinity(const Settings& s, const std::string& automatic);

absl::StatusOr<std::unique_ptr<Workload>> MakeJsonlWorkload(const Settings& s);

}  // namespace superpose::load::internal
