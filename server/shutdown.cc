#include "server/shutdown.h"

#include <chrono>

#include <grpcpp/health_check_service_interface.h>

#include "spdlog/spdlog.h"

namespace superpose::server {

void SetServing(grpc::Server* server, bool serving) {
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus("", serving);
  health->SetServingStatus("superpose.v1.Superpose", serving);
}

void DrainAndStop(grpc::Server* server, SuperposeService* service, engine::Engine* engine,
                  absl::Duration grace) {
  // Refusing first: once a probe sees NOT_SERVING, new calls are refused.
  service->StopAccepting();
  SetServing(server, false);
  const engine::EngineStats before = engine->stats();
  engine->Shutdown(grace);
  const bool flushed = service->WaitForCalls(kFinalWriteWait);
  const engine::EngineStats after = engine->stats();
  spdlog::info("drained: running={} waiting={} at the signal; kv_blocks_free={}/{}; streams {}",
               before.running, before.waiting, after.kv_blocks_free, after.kv_blocks_total,
               flushed ? "all closed" : "not all written in time (cancelled)");
  // Every call is done (or given up on): a deadline already past cancels what is left
  // and closes idle client connections instead of waiting for their clients.
  server->Shutdown(std::chrono::system_clock::now());
}

}  // namespace superpose::server
