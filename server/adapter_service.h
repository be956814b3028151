// LoRA adapter administration (docs/api.md "LoRA adapters"): the SuperposeAdmin gRPC
// service (LoadAdapter, UnloadAdapter, ListAdapters) over the engine's AdapterManager,
// the adapters as /v1/models entries, and the start-up flags' adapters.
//
// Who may call: the API keys' scheme (server/auth.h), nothing new. Without keys
// (--api_keys unset) the admin rpcs are open like every other rpc; with keys a call
// needs the key of a tenant named in --admin_tenants (UNAUTHENTICATED without a valid
// key, PERMISSION_DENIED with another tenant's).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/runtime/adapters.h"
#include "server/auth.h"
#include "superpose/v1/superpose.grpc.pb.h"

namespace superpose::server {

class AdapterAdminService final : public v1::SuperposeAdmin::CallbackService {
 public:
  // `admin_tenants`: comma-separated tenant names (--admin_tenants).
  AdapterAdminService(engine::AdapterManager* adapters, const Authenticator* auth,
                      const std::string& admin_tenants);

  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const v1::LoadAdapterRequest* request,
                                        v1::LoadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const v1::UnloadAdapterRequest* request,
                                          v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const v1::ListAdaptersRequest* request,
                                         v1::ListAdaptersResponse* response) override;

 private:
  // OK for an admin caller (or any caller without keys).
  absl::Status Authorize(const grpc::CallbackServerContext& context) const;

  engine::AdapterManager* adapters_;
  const Authenticator* auth_;
  std::vector<std::string> admin_tenants_;
};

void ToProto(const engine::AdapterInfo& info, v1::AdapterInfo* out);

// Appends one /v1/models entry per adapter (parent: the base model's entry `base`) to
// `data` (nothing when `adapters` is null).
void AppendAdapterModels(const engine::AdapterManager* adapters, const nlohmann::json& base,
                         nlohmann::json* data);

// Adds the adapters of --adapters ("name=DIR,...") to `adapters`; errors name the flag.
absl::Status AddFlagAdapters(engine::AdapterManager* adapters, const std::string& flag);

}  // namespace superpose::server
