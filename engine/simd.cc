#include "engine/simd.h"

#include <algorithm>
#include <atomic>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// One tiny function per target (this file is included once per target by
// hwy/foreach_target.h): asking the dispatch which target it runs costs a table lookup,
// where hwy::SupportedTargets() re-reads CPUID (a VM exit in a virtual machine) and
// kernels ask on every call.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "engine/simd.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/targets.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::simd {
namespace HWY_NAMESPACE {
int64_t DispatchedTarget() { return HWY_TARGET; }
}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine::simd
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace superpose::engine::simd {
HWY_EXPORT(DispatchedTarget);
namespace {

int64_t CompiledTargets() { return HWY_TARGETS; }

// The targets LimitTargets allows (0: no cap). Set as Highway's test mask, not with
// hwy::DisableTargets: Highway 1.0.3's SupportedTargets() re-detects the CPU and re-picks
// the dispatch target without DisableTargets' mask, so any query (ActiveTargetName) would
// silently lift such a cap, whereas every query honours the test mask.
std::atomic<int64_t> g_cap{0};

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

std::string ActiveTargetName() { return TargetName(HWY_DYNAMIC_DISPATCH(DispatchedTarget)()); }

bool ActiveIsAvx512() {
#if HWY_ARCH_X86
  return HWY_DYNAMIC_DISPATCH(DispatchedTarget)() <= HWY_AVX3;
#else
  return false;
#endif
}

absl::Status LimitTargets(const std::string& name) {
  const std::string want = Lower(name);
  const int64_t previous = g_cap.exchange(0);
  hwy::SetSupportedTargetsForTest(0);  // choose among all targets, not the capped ones
  if (want == "auto" || want.empty()) return absl::OkStatus();
  std::vector<std::string> names;
  const std::vector<int64_t> available = AvailableTargets();
  for (int64_t t : available) {
    if (Lower(TargetName(t)) == want) {
      // This target and every worse one (higher bits).
      int64_t cap = 0;
      for (int64_t u : available) cap |= u >= t ? u : 0;
      g_cap = cap;
      hwy::SetSupportedTargetsForTest(cap);
      return absl::OkStatus();
    }
    names.push_back(Lower(TargetName(t)));
  }
  g_cap = previous;
  hwy::SetSupportedTargetsForTest(previous);
  return absl::InvalidArgumentError(absl::StrCat("unknown or unsupported SIMD target '", name,
                                                 "' (this CPU: auto, ", absl::StrJoin(names, ", "),
                                                 ")"));
}

ScopedTarget::ScopedTarget(int64_t target) { hwy::SetSupportedTargetsForTest(target); }
ScopedTarget::~ScopedTarget() { hwy::SetSupportedTargetsForTest(g_cap); }

}  // namespace superpose::engine::simd
#endif  // HWY_ONCE
