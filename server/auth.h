// API-key authentication. A request's tenant (which scopes the prefix cache) is the
// tenant of its key; without configured keys every request is tenant "default".
#pragma once

#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace superpose::server {

class Authenticator {
 public:
  Authenticator() = default;  // no keys: open, tenant "default"
  // Reads "<key> <tenant>" lines ('#' starts a comment). Errors name the file and line.
  static absl::StatusOr<Authenticator> FromFile(const std::string& path);

  bool enabled() const { return !tenants_.empty(); }
  // The tenant of the call's "authorization: Bearer <key>" metadata, or
  // UNAUTHENTICATED.
  absl::StatusOr<std::string> Tenant(const grpc::ServerContextBase& context) const;

 private:
  absl::flat_hash_map<std::string, std::string> tenants_;  // key -> tenant
};

}  // namespace superpose::server
