#include "server/lazy_options.h"

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace superpose::server {

namespace {

engine::LazyOptions FromProto(bool has, const v1::LazyOptions& z) {
  engine::LazyOptions o;
  if (!has) return o;  // kDefault
  if (z.has_enabled() && !z.enabled()) {
    o.mode = engine::LazyOptions::Mode::kOff;
    return o;
  }
  o.mode = engine::LazyOptions::Mode::kOn;
  for (uint32_t b : z.boundary_layers()) {
    // Out of int32 range: still rejected by the engine's layer check.
    o.boundaries.push_back(b > 0x7fffffffu ? 0x7fffffff : static_cast<int32_t>(b));
  }
  o.keep.assign(z.keep_fractions().begin(), z.keep_fractions().end());
  if (z.has_revive()) {
    o.revive = z.revive();
    o.revive_set = true;
  }
  return o;
}

}  // namespace

engine::LazyOptions LazyFromProto(const v1::GenerateRequest& req) {
  return FromProto(req.has_lazy(), req.lazy());
}

engine::LazyOptions LazyFromProto(const v1::GenerateRagRequest& req) {
  return FromProto(req.has_lazy(), req.lazy());
}

void LazyUsageToProto(const engine::Usage& u, v1::Usage* out) {
  if (u.lazy_stage_tokens.empty() && u.lazy_skipped.empty()) return;
  v1::LazyUsage* z = out->mutable_lazy();
  for (int32_t b : u.lazy_boundaries) z->add_boundary_layers(b);
  for (int32_t n : u.lazy_stage_tokens) {
    z->add_stage_tokens(n);
    // Of the prompt tokens this request computed (a cached prefix aside).
    const int32_t computed = u.prompt_tokens - u.cached_prompt_tokens;
    z->add_stage_share(computed > 0 ? static_cast<float>(n) / computed : 0.0f);
  }
  if (!u.lazy_skipped.empty()) z->set_skipped(u.lazy_skipped);
  if (u.lazy_revive) z->set_revived_tokens(static_cast<uint64_t>(u.lazy_revived_tokens));
}

absl::StatusOr<engine::LazyOptions> ParseLazyDefault(const std::string& flag) {
  engine::LazyOptions o;
  if (flag == "off") {
    o.mode = engine::LazyOptions::Mode::kOff;
    return o;
  }
  o.mode = engine::LazyOptions::Mode::kOn;
  if (flag == "paper") return o;
  for (absl::string_view part : absl::StrSplit(flag, ',')) {
    std::vector<absl::string_view> lk = absl::StrSplit(part, ':');
    int32_t layer = 0;
    float keep = 0;
    if (lk.size() != 2 || !absl::SimpleAtoi(lk[0], &layer) || !absl::SimpleAtof(lk[1], &keep)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--lazy_default: '", part, "' is not LAYER:KEEP (use off, paper or 8:0.7,18:0.7)"));
    }
    o.boundaries.push_back(layer);
    o.keep.push_back(keep);
  }
  return o;
}

absl::Status CheckLazyDefault(engine::LazyOptions schedule, int32_t num_layers) {
  absl::Status st = engine::ResolveLazy(num_layers, &schedule);
  if (st.ok()) return st;
  return absl::InvalidArgumentError(absl::StrCat("--lazy_default: ", st.message()));
}

}  // namespace superpose::server
