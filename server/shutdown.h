// The shutdown sequence on SIGTERM / SIGINT (docs/operations.md "Shutdown").
#pragma once

#include <grpcpp/grpcpp.h>

#include "absl/time/time.h"
#include "engine/runtime/engine.h"
#include "server/service.h"

namespace superpose::server {

// Longest wait, after the grace, for the last messages of cut streams to be written.
inline constexpr absl::Duration kFinalWriteWait = absl::Seconds(2);

// Health NOT_SERVING at once (the health service stays reachable throughout); new
// generation calls UNAVAILABLE; queued requests UNAVAILABLE; running ones get `grace`,
// then a final message with usage and finish_reason CANCELLED; then up to
// kFinalWriteWait for those messages to be written; then the gRPC server stops, closing
// idle connections at once. Every KV block is free and the engine thread joined after.
void DrainAndStop(grpc::Server* server, SuperposeService* service, engine::Engine* engine,
                  absl::Duration grace);

// Both health services ("" and superpose.v1.Superpose).
void SetServing(grpc::Server* server, bool serving);

}  // namespace superpose::server
