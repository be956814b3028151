#include "server/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <fstream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "server/tenant_limits.h"

namespace superpose::server {

struct Authenticator::State {
  mutable absl::Mutex mu;
  std::shared_ptr<const Keys> keys ABSL_GUARDED_BY(mu) = std::make_shared<Keys>();
};

Authenticator::Authenticator() : state_(std::make_unique<State>()) {}
Authenticator::~Authenticator() = default;
Authenticator::Authenticator(Authenticator&&) noexcept = default;
Authenticator& Authenticator::operator=(Authenticator&&) noexcept = default;

Authenticator::Digest Authenticator::Sha256(absl::string_view data) {
  Digest d{};
  EVP_Digest(data.data(), data.size(), d.data(), nullptr, EVP_sha256(), nullptr);
  return d;
}

std::string Authenticator::Keys::Summary() const {
  absl::flat_hash_set<std::string> tenants;
  for (const Entry& e : entries) tenants.insert(e.tenant);
  return absl::StrCat(entries.size(), " keys, ", tenants.size(), " tenants");
}

absl::StatusOr<Authenticator::Keys> Authenticator::ReadKeys(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  Keys keys;
  TenantLimitsBuilder limits;
  absl::flat_hash_set<std::string> digests;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    const std::string body(absl::StripAsciiWhitespace(line.substr(0, line.find('#'))));
    if (body.empty()) continue;
    std::vector<std::string> parts = absl::StrSplit(body, ' ', absl::SkipWhitespace());
    if (parts.size() < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": expected '<key> <tenant> [name=value ...]'"));
    }
    const Digest digest = Sha256(parts[0]);
    if (!digests.emplace(digest.begin(), digest.end()).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": duplicate key"));
    }
    if (absl::Status st = limits.Add(path, n, parts[1], absl::MakeConstSpan(parts).subspan(2));
        !st.ok()) {
      return st;
    }
    keys.entries.push_back({digest, parts[1]});
  }
  if (keys.entries.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no keys"));
  keys.policies = limits.Build();
  return keys;
}

absl::StatusOr<Authenticator> Authenticator::FromFile(const std::string& path) {
  absl::StatusOr<Keys> keys = ReadKeys(path);
  if (!keys.ok()) return keys.status();
  Authenticator a;
  a.path_ = path;
  absl::MutexLock lock(&a.state_->mu);
  a.state_->keys = std::make_shared<const Keys>(*std::move(keys));
  return a;
}

absl::StatusOr<std::string> Authenticator::Reload() {
  if (path_.empty()) return std::string("no key file");
  absl::StatusOr<Keys> keys = ReadKeys(path_);
  if (!keys.ok()) return keys.status();
  std::string summary = keys->Summary();
  auto fresh = std::make_shared<const Keys>(*std::move(keys));
  absl::MutexLock lock(&state_->mu);
  state_->keys = std::move(fresh);
  return summary;
}

engine::TenantPolicies Authenticator::tenant_policies() const { return keys()->policies; }

std::shared_ptr<const Authenticator::Keys> Authenticator::keys() const {
  absl::MutexLock lock(&state_->mu);
  return state_->keys;
}

absl::StatusOr<std::string> Authenticator::TenantOfAuthorization(absl::string_view value) const {
  if (!enabled()) return std::string("default");
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(value, kBearer)) {
    return absl::UnauthenticatedError("authorization metadata must be 'Bearer <key>'");
  }
  const Digest d = Sha256(value.substr(kBearer.size()));
  const std::shared_ptr<const Keys> keys = this->keys();
  // Every entry is compared, with no early exit: the time does not depend on which
  // entry (if any) matches.
  const Entry* found = nullptr;
  for (const Entry& e : keys->entries) {
    const bool eq = CRYPTO_memcmp(d.data(), e.digest.data(), d.size()) == 0;
    found = eq ? &e : found;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown API key");
  return found->tenant;
}

absl::StatusOr<std::string> Authenticator::Tenant(const grpc::ServerContextBase& context) const {
  std::string tenant = "default";
  if (enabled()) {
    const auto& md = context.client_metadata();
    auto it = md.find("authorization");
    if (it == md.end()) {
      return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
    }
    absl::StatusOr<std::string> t =
        TenantOfAuthorization(absl::string_view(it->second.data(), it->second.size()));
    if (!t.ok()) return t.status();
    tenant = *std::move(t);
  }
  if (!tenant_from_client_cert_) return tenant;
  // The client certificate decides the tenant (--tenant_from_client_cert); the server
  // requires and verifies one (--tls_client_ca), so a missing name is a bad certificate.
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  std::vector<grpc::string_ref> cn =
      auth ? auth->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME) : std::vector<grpc::string_ref>{};
  if (cn.empty() || cn[0].empty()) {
    return absl::UnauthenticatedError("the client certificate has no subject common name");
  }
  return std::string(cn[0].data(), cn[0].size());
}

}  // namespace superpose::server
