#include "engine/runtime/tenant_policy.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace superpose::engine {

const TenantPolicy& TenantPolicies::For(const std::string& tenant) const {
  static const TenantPolicy kDefault;
  auto it = tenants.find(tenant);
  return it == tenants.end() ? kDefault : it->second;
}

int32_t TenantPolicies::MaxQueued(const std::string& tenant) const {
  const int32_t own = For(tenant).max_queued;
  return own > 0 ? own : default_max_queued;
}

absl::Status CheckTenant(const std::string& tenant, const TenantPolicies& policies, int32_t queued,
                         int64_t tokens_in_flight, int64_t prompt_tokens, int64_t retry_after_ms) {
  const int32_t max_queued = policies.MaxQueued(tenant);
  if (max_queued > 0 && queued >= max_queued) {
    return WithRetryAfter(absl::ResourceExhaustedError(absl::StrCat(
                              "tenant '", tenant, "' has ", queued,
                              " requests queued (its max_queued is ", max_queued, ")")),
                          retry_after_ms);
  }
  const int64_t max_tokens = policies.For(tenant).max_prompt_tokens;
  if (max_tokens > 0 && prompt_tokens > max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this request's ", prompt_tokens, " prompt tokens exceed the max_prompt_tokens (",
        max_tokens, ") of tenant '", tenant, "'"));
  }
  if (max_tokens > 0 && tokens_in_flight + prompt_tokens > max_tokens) {
    return WithRetryAfter(
        absl::ResourceExhaustedError(absl::StrCat(
            "tenant '", tenant, "' has ", tokens_in_flight, " prompt tokens in flight; this ",
            "request's ", prompt_tokens, " would exceed its max_prompt_tokens (", max_tokens, ")")),
        retry_after_ms);
  }
  return absl::OkStatus();
}

absl::Status WithRetryAfter(absl::Status status, int64_t ms) {
  status.SetPayload(kRetryAfterMsPayload, absl::Cord(absl::StrCat(ms)));
  return status;
}

std::optional<int64_t> RetryAfterMs(const absl::Status& status) {
  const auto p = status.GetPayload(kRetryAfterMsPayload);
  int64_t ms = 0;
  if (!p || !absl::SimpleAtoi(std::string(*p), &ms)) return std::nullopt;
  return ms;
}

}  // namespace superpose::engine
