// A copy of a checkpoint with every tensor rounded to bf16, as the CUDA backend stores
// it: what the GPU tests load into the float32 CPU backend to compare against.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/model/weights.h"

namespace superpose::testing {

inline float RoundBf16(float v) { return engine::Bf16ToF32(engine::F32ToBf16(v)); }

inline std::unique_ptr<engine::InMemoryWeights> RoundedWeights(const engine::WeightSource& src) {
  auto w = std::make_unique<engine::InMemoryWeights>();
  for (const std::string& name : src.Names()) {
    absl::StatusOr<engine::TensorView> tv = src.Get(name);
    EXPECT_TRUE(tv.ok()) << name;
    if (!tv.ok()) continue;
    std::vector<float> f(static_cast<size_t>(tv->numel()));
    EXPECT_TRUE(src.ReadF32(name, tv->shape, f.data()).ok()) << name;
    for (float& v : f) v = RoundBf16(v);
    w->Add(name, tv->shape, std::move(f));
  }
  return w;
}

}  // namespace superpose::testing
