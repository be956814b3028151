// API-key authentication. A request's tenant (which scopes the prefix cache) is the
// tenant of its key; without configured keys every request is tenant "default".
#pragma once

#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/runtime/tenant_policy.h"

namespace superpose::server {

class Authenticator {
 public:
  Authenticator() = default;  // no keys: open, tenant "default"
  // Reads "<key> <tenant> [name=value ...]" lines ('#' starts a comment; the limits are
  // server/tenant_limits.h's). Errors name the file and line.
  static absl::StatusOr<Authenticator> FromFile(const std::string& path);

  bool enabled() const { return !tenants_.empty(); }
  // The tenant of the call's "authorization: Bearer <key>" metadata, or
  // UNAUTHENTICATED.
  absl::StatusOr<std::string> Tenant(const grpc::ServerContextBase& context) const;
  // Every tenant of the file with its limits (none without keys).
  const engine::TenantPolicies& tenant_policies() const { return policies_; }

 private:
  absl::flat_hash_map<std::string, std::string> tenants_;  // key -> tenant
  engine::TenantPolicies policies_;
};

}  // namespace superpose::server
