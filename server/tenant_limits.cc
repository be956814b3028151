#include "server/tenant_limits.h"

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace superpose::server {
namespace {

struct Field {
  const char* name;
  int64_t min;
  int64_t max;
};

constexpr Field kFields[] = {
    {"max_running", 1, 1 << 20},
    {"max_queued", 1, 1 << 20},
    {"max_prompt_tokens", 1, int64_t{1} << 40},
    {"max_priority", -100, 100},
    {"weight", 1, 1000},
};

const Field* FindField(const std::string& name) {
  for (const Field& f : kFields) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

std::string FieldNames() {
  std::vector<std::string> names;
  for (const Field& f : kFields) names.push_back(f.name);
  return absl::StrJoin(names, ", ");
}

}  // namespace

absl::Status TenantLimitsBuilder::Add(const std::string& path, int line, const std::string& tenant,
                                      absl::Span<const std::string> fields) {
  tenants_[tenant];  // a tenant without limits is a tenant too
  const std::string where = absl::StrCat(path, ":", line, ": ");
  for (const std::string& word : fields) {
    const size_t eq = word.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "expected name=value after the tenant, got '", word, "'"));
    }
    const std::string name = word.substr(0, eq);
    const Field* f = FindField(name);
    if (f == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "unknown field '", name, "' (known: ", FieldNames(), ")"));
    }
    int64_t value = 0;
    if (!absl::SimpleAtoi(word.substr(eq + 1), &value) || value < f->min || value > f->max) {
      return absl::InvalidArgumentError(absl::StrCat(where, name, ": expected an integer in [",
                                                     f->min, ", ", f->max, "], got '",
                                                     word.substr(eq + 1), "'"));
    }
    if (absl::Status st = Set(where, tenant, name, value, line); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status TenantLimitsBuilder::Set(const std::string& where, const std::string& tenant,
                                      const std::string& name, int64_t value, int line) {
  Entry& e = tenants_[tenant];
  auto [it, inserted] = e.given.try_emplace(name, value, line);
  if (!inserted && it->second.first != value) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, name, "=", value, " conflicts with ", name, "=", it->second.first, " on line ",
        it->second.second, " (the limits belong to tenant '", tenant, "', whichever key)"));
  }
  engine::TenantPolicy& p = e.policy;
  if (name == "max_running") p.max_running = static_cast<int32_t>(value);
  if (name == "max_queued") p.max_queued = static_cast<int32_t>(value);
  if (name == "max_prompt_tokens") p.max_prompt_tokens = value;
  if (name == "max_priority") p.max_priority = static_cast<int32_t>(value);
  if (name == "weight") p.weight = static_cast<int32_t>(value);
  return absl::OkStatus();
}

engine::TenantPolicies TenantLimitsBuilder::Build() const {
  engine::TenantPolicies out;
  for (const auto& [tenant, e] : tenants_) out.tenants[tenant] = e.policy;
  return out;
}

engine::TenantPolicies EnginePolicies(engine::TenantPolicies from_keys, int32_t tenant_max_waiting,
                                      int32_t max_waiting) {
  if (tenant_max_waiting > 0) {
    from_keys.default_max_queued = tenant_max_waiting;
  } else if (tenant_max_waiting < 0 && from_keys.tenants.size() >= 2) {
    from_keys.default_max_queued = std::max(1, max_waiting / 2);
  } else {
    from_keys.default_max_queued = 0;
  }
  return from_keys;
}

}  // namespace superpose::server
