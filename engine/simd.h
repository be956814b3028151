// Which SIMD target the CPU kernels run on. The kernels are written once with Google
// Highway and compiled for every target of the architecture (x86: AVX-512 "AVX3",
// AVX2, SSE4 and a portable fallback, "EMU128" or "SCALAR"; Arm: NEON and the fallback); the best
// target the CPU supports is picked at run time. An operator (or a benchmark) may cap it lower, and
// a test runs a kernel on each target in turn.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace superpose::engine::simd {

// The target the kernels dispatch to now ("AVX3", "AVX2", "SSE4", "NEON", "EMU128").
std::string ActiveTargetName();
// Every target compiled in and supported by this CPU, best first (Highway bits).
std::vector<int64_t> AvailableTargets();
std::string TargetName(int64_t target);
// True when the active target is AVX3 (AVX-512 F/VL/DQ/BW) or better: the hand-written
// AVX-512 special cases (AVX512-BF16, AMX) run only then.
bool ActiveIsAvx512();

// Caps the targets for the whole process at `name` ("auto" = no cap, lifting an earlier
// one; otherwise one of the uncapped AvailableTargets()' names, case-insensitive). Error
// naming the choices when unknown or not supported by this CPU (the cap is then unchanged).
absl::Status LimitTargets(const std::string& name);

// Restricts dispatch to `target` while it lives (tests), then back to LimitTargets' cap. Not
// thread-safe against kernels running at the same time.
class ScopedTarget {
 public:
  explicit ScopedTarget(int64_t target);
  ~ScopedTarget();
  ScopedTarget(const ScopedTarget&) = delete;
  ScopedTarget& operator=(const ScopedTarget&) = delete;
};

}  // namespace superpose::engine::simd
