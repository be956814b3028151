#include "server/auth.h"

#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "server/tenant_limits.h"

namespace superpose::server {

absl::StatusOr<Authenticator> Authenticator::FromFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  Authenticator a;
  TenantLimitsBuilder limits;
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
    if (!a.tenants_.emplace(parts[0], parts[1]).second) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": duplicate key"));
    }
    if (absl::Status st = limits.Add(path, n, parts[1], absl::MakeConstSpan(parts).subspan(2));
        !st.ok()) {
      return st;
    }
  }
  if (a.tenants_.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no keys"));
  a.policies_ = limits.Build();
  return a;
}

absl::StatusOr<std::string> Authenticator::Tenant(const grpc::ServerContextBase& context) const {
  if (tenants_.empty()) return std::string("default");
  const auto& md = context.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError("missing 'authorization: Bearer <key>' metadata");
  }
  const std::string value(it->second.data(), it->second.size());
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(value, kBearer)) {
    return absl::UnauthenticatedError("authorization metadata must be 'Bearer <key>'");
  }
  auto t = tenants_.find(value.substr(kBearer.size()));
  if (t == tenants_.end()) return absl::UnauthenticatedError("unknown API key");
  return t->second;
}

}  // namespace superpose::server
