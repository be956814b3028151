// Runs a test body once per SIMD target this CPU supports (Highway dispatch restricted to
// that target), with the target's name in the failure trace.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "engine/simd.h"

namespace superpose::testing {

template <typename Fn>
void ForEachSimdTarget(Fn&& fn) {
  for (int64_t t : engine::simd::AvailableTargets()) {
    const std::string name = engine::simd::TargetName(t);
    SCOPED_TRACE("SIMD target " + name);
    engine::simd::ScopedTarget scoped(t);
    fn(name);
  }
}

// The same, but only the vector targets: whole-model tests skip the portable fallback
// (EMU128 / SCALAR: x86 machines never run it, and it is slow enough under the sanitizers
// to time out); the kernels' own tests cover it. In the sanitizer builds only the best
// vector target runs: the kernels' own tests run every target there, and the
// whole-model loops were the slowest part of the sanitizer stage.
template <typename Fn>
void ForEachVectorSimdTarget(Fn&& fn) {
  bool ran = false;
  ForEachSimdTarget([&](const std::string& name) {
    if (name == "EMU128" || name == "SCALAR") return;
#if defined(SP_SANITIZER_BUILD)
    if (ran) return;
#endif
    ran = true;
    fn(name);
  });
}

}  // namespace superpose::testing
