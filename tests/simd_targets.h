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

}  // namespace superpose::testing
