// A Backend that forwards every call to another one: the base of the tests' wrappers,
// which override Forward (or more) to record, count or inject failures.
#pragma once

#include <string>

#include "engine/backend.h"

namespace superpose::testing {

class ForwardingBackend : public engine::Backend {
 public:
  explicit ForwardingBackend(engine::Backend* inner) : inner_(inner) {}
  std::string name() const override { return inner_->name(); }
  std::string compute_dtype() const override { return inner_->compute_dtype(); }
  absl::Status Load(const engine::ModelConfig& c, const engine::WeightSource& w,
                    const engine::Shard& s) override {
    return inner_->Load(c, w, s);
  }
  absl::Status Forward(const engine::BatchPlan& plan, engine::ForwardOutput* out) override {
    return inner_->Forward(plan, out);
  }
  engine::KvPoolInfo kv() const override { return inner_->kv(); }
  bool SamplesRows() const override { return inner_->SamplesRows(); }
  bool SupportsLazy() const override { return inner_->SupportsLazy(); }
  bool SupportsLazyRevival() const override { return inner_->SupportsLazyRevival(); }
  void ReleaseSequence(engine::SeqId id) override { inner_->ReleaseSequence(id); }
  bool SupportsAdapters() const override { return inner_->SupportsAdapters(); }
  absl::Status LoadAdapter(int64_t id, const engine::LoraAdapter& a) override {
    return inner_->LoadAdapter(id, a);
  }
  absl::Status UnloadAdapter(int64_t id) override { return inner_->UnloadAdapter(id); }
  absl::Status Health() const override { return inner_->Health(); }
  absl::Status ZeroKvBlocks(absl::Span<const engine::BlockId> blocks) override {
    return inner_->ZeroKvBlocks(blocks);
  }
  absl::StatusOr<std::vector<uint8_t>> KvBlockBytes(engine::BlockId block) const override {
    return inner_->KvBlockBytes(block);
  }

 protected:
  engine::Backend* inner() const { return inner_; }

 private:
  engine::Backend* inner_;
};

}  // namespace superpose::testing
