// LazyLLM's server side: the request option and the usage report (proto <-> engine)
// and the --lazy_default flag.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "engine/lazy.h"
#include "engine/sequence/request.h"
#include "superpose/v1/superpose.pb.h"

namespace superpose::server {

// The request's option as the engine takes it (checked there against the model).
engine::LazyOptions LazyFromProto(const v1::GenerateRequest& req);
engine::LazyOptions LazyFromProto(const v1::GenerateRagRequest& req);

// usage.lazy, when LazyLLM ran or was skipped.
void LazyUsageToProto(const engine::Usage& u, v1::Usage* out);

// --lazy_default: "off", "paper" (the paper's schedule for the model) or boundary
// layers with keep fractions, "LAYER:KEEP,LAYER:KEEP,..." (e.g. "8:0.7,18:0.7,27:0.7").
// INVALID_ARGUMENT naming the flag. The layers are checked against the model by
// CheckLazyDefault once it is loaded.
absl::StatusOr<engine::LazyOptions> ParseLazyDefault(const std::string& flag);
absl::Status CheckLazyDefault(engine::LazyOptions schedule, int32_t num_layers);

}  // namespace superpose::server
