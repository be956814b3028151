// API-key authentication. A request's tenant (which scopes the prefix cache) is the
// tenant of its key; without configured keys every request is tenant "default". With
// --tenant_from_client_cert the tenant is the subject common name of the client's
// (mutual TLS) certificate instead; a key is still required when keys are configured.
//
// Keys are kept as SHA-256 digests only, and a presented key's digest is compared with
// every entry in constant time (CRYPTO_memcmp, no early exit), so neither the key table
// nor the comparison's timing reveals a key. Reload() re-reads the key file (SIGHUP).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/runtime/tenant_policy.h"

namespace superpose::server {

class Authenticator {
 public:
  Authenticator();  // no keys: open, tenant "default"
  ~Authenticator();
  Authenticator(Authenticator&&) noexcept;
  Authenticator& operator=(Authenticator&&) noexcept;
  // Reads "<key> <tenant> [name=value ...]" lines ('#' starts a comment; the limits are
  // server/tenant_limits.h's). Errors name the file and line, never a key.
  static absl::StatusOr<Authenticator> FromFile(const std::string& path);

  bool enabled() const { return !path_.empty(); }
  // The tenant of the call: its "authorization: Bearer <key>" metadata (when keys are
  // configured; else UNAUTHENTICATED), or its client certificate's common name.
  absl::StatusOr<std::string> Tenant(const grpc::ServerContextBase& context) const;
  // The tenant of an authorization header value "Bearer <key>" (the metrics endpoint);
  // "default" when no keys are configured.
  absl::StatusOr<std::string> TenantOfAuthorization(absl::string_view value) const;
  // Re-reads the key file. On success the new keys replace the old ones at once (calls
  // in flight keep their tenant) and the summary ("3 keys, 2 tenants") is returned; on
  // error the old keys stay. No-op without a key file.
  absl::StatusOr<std::string> Reload();
  void set_tenant_from_client_cert(bool on) { tenant_from_client_cert_ = on; }
  // Every tenant of the file with its limits (none without keys), as last (re)loaded.
  engine::TenantPolicies tenant_policies() const;

 private:
  using Digest = std::array<uint8_t, 32>;
  struct Entry {
    Digest digest;
    std::string tenant;
  };
  struct Keys {
    std::vector<Entry> entries;
    engine::TenantPolicies policies;
    std::string Summary() const;
  };
  struct State;
  static absl::StatusOr<Keys> ReadKeys(const std::string& path);
  static Digest Sha256(absl::string_view data);
  std::shared_ptr<const Keys> keys() const;

  std::string path_;
  bool tenant_from_client_cert_ = false;
  std::unique_ptr<State> state_;
};

}  // namespace superpose::server
