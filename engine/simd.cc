#include "engine/simd.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "hwy/highway.h"
#include "hwy/targets.h"

namespace superpose::engine::simd {
namespace {

int64_t CompiledTargets() { return HWY_TARGETS; }

// Lowest bit = best target (Highway numbers better targets lower).
int64_t BestOf(int64_t mask) { return mask & -mask; }

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

}  // namespace

std::string TargetName(int64_t target) { return hwy::TargetName(target); }

std::vector<int64_t> AvailableTargets() {
  std::vector<int64_t> out;
  int64_t mask = hwy::SupportedTargets() & CompiledTargets();
  while (mask != 0) {
    const int64_t best = BestOf(mask);
    out.push_back(best);
    mask &= ~best;
  }
  return out;
}

std::string ActiveTargetName() {
  return TargetName(BestOf(hwy::SupportedTargets() & CompiledTargets()));
}

bool ActiveIsAvx512() {
#if HWY_ARCH_X86
  const int64_t best = BestOf(hwy::SupportedTargets() & CompiledTargets());
  return best != 0 && best <= HWY_AVX3;
#else
  return false;
#endif
}

absl::Status LimitTargets(const std::string& name) {
  const std::string want = Lower(name);
  if (want == "auto" || want.empty()) return absl::OkStatus();
  std::vector<std::string> names;
  for (int64_t t : AvailableTargets()) {
    if (Lower(TargetName(t)) == want) {
      // Disable every better target (lower bits).
      hwy::DisableTargets(t - 1);
      return absl::OkStatus();
    }
    names.push_back(Lower(TargetName(t)));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown or unsupported SIMD target '", name,
                                                 "' (this CPU: auto, ", absl::StrJoin(names, ", "),
                                                 ")"));
}

ScopedTarget::ScopedTarget(int64_t target) { hwy::SetSupportedTargetsForTest(target); }
ScopedTarget::~ScopedTarget() { hwy::SetSupportedTargetsForTest(0); }

}  // namespace superpose::engine::simd
