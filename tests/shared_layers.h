// Two checkpoints of one model for the cross-layer weight sharing tests
// (config.json "layer_weight_map"): `shared` lacks the layers that map to another,
// `copied` holds, in each such layer, a copy of its owner's tensors.
#pragma once

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model/weights.h"
#include "engine/runtime/model_bundle.h"

namespace superpose::testing {

inline void SplitSharedLayers(const engine::ModelBundle& model, const std::vector<int32_t>& map,
                              engine::InMemoryWeights* shared, engine::InMemoryWeights* copied) {
  for (const std::string& name : model.weights->Names()) {
    auto view = model.weights->Get(name);
    ASSERT_TRUE(view.ok());
    int64_t n = 1;
    for (int64_t d : view->shape) n *= d;
    std::vector<float> data(n);
    ASSERT_TRUE(model.weights->ReadF32(name, view->shape, data.data()).ok());
    int32_t layer = -1;
    if (name.rfind("model.layers.", 0) == 0) layer = std::stoi(name.substr(13));
    if (layer < 0 || map[layer] == layer) shared->Add(name, view->shape, data);
    if (layer < 0) {
      copied->Add(name, view->shape, data);
      continue;
    }
    for (int32_t l = 0; l < static_cast<int32_t>(map.size()); ++l) {
      if (map[l] != layer) continue;
      const std::string suffix = name.substr(name.find('.', 13));
      copied->Add(absl::StrCat("model.layers.", l, suffix), view->shape, data);
    }
  }
}

}  // namespace superpose::testing
