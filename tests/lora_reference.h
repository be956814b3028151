// The dense reference of a LoRA adapter: the model's weights with W + scale B A in place
// of each adapted W (accumulated in double), for tests that compare the adapter path
// with a plain forward.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/lora_adapter.h"
#include "engine/model/weights.h"
#include "engine/runtime/model_bundle.h"

namespace superpose::testing {

// The model with W + scale B A in place of each adapted W.
inline std::unique_ptr<engine::InMemoryWeights> MergedLoraWeights(const engine::ModelBundle& m,
                                                                  const engine::LoraAdapter& a) {
  auto w = std::make_unique<engine::InMemoryWeights>();
  const char* blocks[] = {"self_attn", "self_attn", "self_attn", "self_attn", "mlp", "mlp", "mlp"};
  for (const std::string& name : m.weights->Names()) {
    auto t = m.weights->Get(name);
    std::vector<float> data(t->numel());
    EXPECT_TRUE(m.weights->ReadF32(name, t->shape, data.data()).ok());
    for (size_t l = 0; l < a.layers.size(); ++l) {
      for (int mod = 0; mod < engine::kNumLoraModules; ++mod) {
        const std::string want = "model.layers." + std::to_string(l) + "." + blocks[mod] + "." +
                                 engine::LoraModuleName(mod) + ".weight";
        const engine::LoraMatrices& p = a.layers[l][mod];
        if (name != want || p.empty()) continue;
        const engine::LoraDims d = engine::LoraModuleDims(m.config, mod);
        for (int64_t o = 0; o < d.out; ++o) {
          for (int64_t i = 0; i < d.in; ++i) {
            double s = 0;
            for (int32_t k = 0; k < a.rank; ++k) {
              s += double{p.b[o * a.rank + k]} * p.a[k * d.in + i];
            }
            data[o * d.in + i] += static_cast<float>(a.scale * s);
          }
        }
      }
    }
    w->Add(name, t->shape, std::move(data));
  }
  return w;
}

}  // namespace superpose::testing
