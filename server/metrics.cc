#include "server/metrics.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/runtime/adapters.h"
#include "spdlog/spdlog.h"

namespace superpose::server {
namespace {

std::vector<double> LatencyBounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

void Counter(const std::string& name, const std::string& help, uint64_t v, std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, " ", v,
                  "\n");
}

void FloatCounter(const std::string& name, const std::string& help, double v, std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, " ",
                  absl::StrFormat("%.6e", v), "\n");
}

void Gauge(const std::string& name, const std::string& help, int64_t v, std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, " ", v,
                  "\n");
}

// A Prometheus label value: backslash, double quote and newline escaped.
std::string LabelValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return out;
}

// The finish label of a request: its finish reason, or cancelled / error.
std::string FinishLabel(engine::FinishReason reason, const absl::Status& status) {
  if (status.ok()) return engine::FinishReasonName(reason);
  return status.code() == absl::StatusCode::kCancelled ||
                 status.code() == absl::StatusCode::kDeadlineExceeded
             ? "cancelled"
             : "error";
}

void Header(const std::string& name, const std::string& type, const std::string& help,
            std::string* out) {
  absl::StrAppend(out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += v;
  ++count_;
}

void Histogram::Render(const std::string& name, std::string* out) const {
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    absl::StrAppend(out, name, "_bucket{le=\"", bounds_[i], "\"} ", cum, "\n");
  }
  cum += counts_.back();
  absl::StrAppend(out, name, "_bucket{le=\"+Inf\"} ", cum, "\n");
  absl::StrAppend(out, name, "_sum ", absl::StrFormat("%.6f", sum_), "\n");
  absl::StrAppend(out, name, "_count ", count_, "\n");
}

Metrics::Metrics()
    : queue_time_s_(LatencyBounds()),
      ttft_s_(LatencyBounds()),
      itl_s_({0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56}),
      e2e_s_(LatencyBounds()),
      batch_tokens_({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096}) {
  for (const char* r : {"length", "stop", "eos", "cancelled", "error"}) finished_[r] = 0;
  for (const char* m : {"superposition", "naive"}) rag_requests_[m] = 0;
}

void Metrics::OnRagFinished(const engine::rag::Result& r) {
  absl::MutexLock lock(&mu_);
  ++rag_requests_[r.mode == engine::rag::Mode::kNaive ? "naive" : "superposition"];
  if (r.mode == engine::rag::Mode::kSuperposition) {
    rag_paths_ += r.docs.size();
    for (const auto& d : r.docs) rag_paths_pruned_ += d.kept ? 0 : 1;
  }
  rag_path_cache_tokens_ += r.path_cache_tokens;
  rag_pruned_tokens_ += r.pruned_tokens;
  rag_flops_ += r.flops.total;
  rag_critical_flops_ += r.flops.critical_path;
  rag_naive_flops_ += r.naive_flops.total;
}

void Metrics::OnFinished(const engine::Usage& usage, engine::FinishReason reason,
                         const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  ++finished_[FinishLabel(reason, status)];
  prompt_tokens_ += usage.prompt_tokens;
  generated_tokens_ += usage.generated_tokens;
  cached_tokens_ += usage.cached_prompt_tokens;
  e2e_s_.Observe(usage.total_time_ms / 1000.0);
}

void Metrics::OnFirstToken(double queue_time_ms, double ttft_ms) {
  absl::MutexLock lock(&mu_);
  queue_time_s_.Observe(queue_time_ms / 1000.0);
  ttft_s_.Observe(ttft_ms / 1000.0);
}

void Metrics::OnToken(double inter_token_ms) {
  absl::MutexLock lock(&mu_);
  itl_s_.Observe(inter_token_ms / 1000.0);
}

void Metrics::OnPreempted() {
  absl::MutexLock lock(&mu_);
  ++preemptions_;
}

void Metrics::OnLazyPrefill(int64_t, int64_t pruned_tokens) {
  absl::MutexLock lock(&mu_);
  ++lazy_prefills_;
  lazy_pruned_tokens_ += static_cast<uint64_t>(pruned_tokens);
}

void Metrics::OnLazyRevived(int64_t tokens) {
  absl::MutexLock lock(&mu_);
  lazy_revived_tokens_ += static_cast<uint64_t>(tokens);
}

void Metrics::OnStep(int32_t, int32_t, int32_t batch_tokens) {
  absl::MutexLock lock(&mu_);
  ++steps_;
  batch_tokens_.Observe(batch_tokens);
}

void Metrics::OnRejected(const std::string& code, const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  ++rejected_[code];
  if (!tenant.empty()) ++tenants_[tenant].rejected[code];
}

void Metrics::OnTenantFinished(const std::string& tenant, const engine::Usage& usage,
                               engine::FinishReason reason, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  TenantCounters& t = tenants_[tenant];
  ++t.finished[FinishLabel(reason, status)];
  t.prompt_tokens += usage.prompt_tokens;
  t.generated_tokens += usage.generated_tokens;
  t.cached_tokens += usage.cached_prompt_tokens;
  t.queue_seconds += usage.queue_time_ms / 1000.0;
  ++t.queued;
}

void Metrics::OnQueueTimeout(const std::string& tenant) {
  absl::MutexLock lock(&mu_);
  ++tenants_[tenant].rejected[absl::StatusCodeToString(absl::StatusCode::kResourceExhausted)];
}

void Metrics::RenderTenants(std::string* out) const {
  auto each = [&](const std::string& name, const std::string& type, const std::string& help,
                  auto value) {
    Header(name, type, help, out);
    for (const auto& [tenant, t] : tenants_)
      value(absl::StrCat("tenant=\"", LabelValue(tenant), "\""), t);
  };
  each("superpose_tenant_requests_finished_total", "counter",
       "Requests that reached the engine, by tenant and finish reason.",
       [&](const std::string& l, const TenantCounters& t) {
         for (const auto& [reason, n] : t.finished) {
           absl::StrAppend(out, "superpose_tenant_requests_finished_total{", l, ",reason=\"",
                           reason, "\"} ", n, "\n");
         }
       });
  each("superpose_tenant_requests_rejected_total", "counter",
       "Requests refused, by tenant and gRPC status code: before the engine, or not admitted "
       "within --max_queue_ms.",
       [&](const std::string& l, const TenantCounters& t) {
         for (const auto& [code, n] : t.rejected) {
           absl::StrAppend(out, "superpose_tenant_requests_rejected_total{", l, ",code=\"", code,
                           "\"} ", n, "\n");
         }
       });
  each("superpose_tenant_queue_time_seconds", "summary",
       "Time from arrival to admission of the tenant's finished requests.",
       [&](const std::string& l, const TenantCounters& t) {
         absl::StrAppend(out, "superpose_tenant_queue_time_seconds_sum{", l, "} ",
                         absl::StrFormat("%.6f", t.queue_seconds), "\n",
                         "superpose_tenant_queue_time_seconds_count{", l, "} ", t.queued, "\n");
       });
  const std::pair<const char*, uint64_t TenantCounters::*> tokens[] = {
      {"prompt", &TenantCounters::prompt_tokens},
      {"generated", &TenantCounters::generated_tokens},
      {"cached_prompt", &TenantCounters::cached_tokens}};
  for (const auto& [kind, field] : tokens) {
    const std::string name = absl::StrCat("superpose_tenant_", kind, "_tokens_total");
    each(name, "counter", absl::StrCat("The tenant's ", kind, " tokens (finished requests)."),
         [&, f = field](const std::string& l, const TenantCounters& t) {
           absl::StrAppend(out, name, "{", l, "} ", t.*f, "\n");
         });
  }
}

std::string Metrics::Render() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  auto hist = [&](const std::string& name, const std::string& help, const Histogram& h) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " histogram\n");
    h.Render(name, &out);
  };
  hist("superpose_queue_time_seconds", "Time from arrival to first scheduling.", queue_time_s_);
  hist("superpose_time_to_first_token_seconds", "Time from arrival to the first token.", ttft_s_);
  hist("superpose_inter_token_latency_seconds", "Time between consecutive tokens of a stream.",
       itl_s_);
  hist("superpose_e2e_latency_seconds", "Time from arrival to the end of a request.", e2e_s_);
  hist("superpose_batch_tokens", "New tokens per engine step.", batch_tokens_);
  absl::StrAppend(&out,
                  "# HELP superpose_requests_finished_total Requests that reached the engine, "
                  "by finish reason.\n# TYPE superpose_requests_finished_total counter\n");
  for (const auto& [reason, n] : finished_) {
    absl::StrAppend(&out, "superpose_requests_finished_total{reason=\"", reason, "\"} ", n, "\n");
  }
  absl::StrAppend(&out,
                  "# HELP superpose_requests_rejected_total Requests refused before the "
                  "engine, by gRPC status code.\n"
                  "# TYPE superpose_requests_rejected_total counter\n");
  for (const auto& [code, n] : rejected_) {
    absl::StrAppend(&out, "superpose_requests_rejected_total{code=\"", code, "\"} ", n, "\n");
  }
  RenderTenants(&out);
  Counter("superpose_prompt_tokens_total", "Prompt tokens of finished requests.", prompt_tokens_,
          &out);
  Counter("superpose_generated_tokens_total", "Generated tokens.", generated_tokens_, &out);
  Counter("superpose_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.",
          cached_tokens_, &out);
  Counter("superpose_preemptions_total", "Sequences preempted when KV blocks ran out.",
          preemptions_, &out);
  Counter("superpose_lazy_prefills_total", "Prompts prefilled with LazyLLM pruning.",
          lazy_prefills_, &out);
  Counter("superpose_lazy_pruned_tokens_total",
          "Prompt tokens LazyLLM's prefills pruned before the last stage.", lazy_pruned_tokens_,
          &out);
  Counter("superpose_lazy_revived_tokens_total",
          "Prompt tokens LazyLLM's decode steps revived into a stage from the Aux Cache.",
          lazy_revived_tokens_, &out);
  Counter("superpose_engine_steps_total", "Engine iterations that ran the backend.", steps_, &out);
  absl::StrAppend(&out,
                  "# HELP superpose_rag_requests_total GenerateRag requests finished, by "
                  "mode.\n# TYPE superpose_rag_requests_total counter\n");
  for (const auto& [mode, n] : rag_requests_) {
    absl::StrAppend(&out, "superpose_rag_requests_total{mode=\"", mode, "\"} ", n, "\n");
  }
  Counter("superpose_rag_paths_total", "Document paths of superposition requests.", rag_paths_,
          &out);
  Counter("superpose_rag_paths_pruned_total", "Paths dropped by top-k pruning.", rag_paths_pruned_,
          &out);
  Counter("superpose_rag_pruned_tokens_total", "Document + query tokens of pruned paths.",
          rag_pruned_tokens_, &out);
  Counter("superpose_rag_path_cache_tokens_total",
          "Document tokens whose KV came from the path cache.", rag_path_cache_tokens_, &out);
  FloatCounter("superpose_rag_flops_total", "FLOPs spent on RAG requests.", rag_flops_, &out);
  FloatCounter("superpose_rag_critical_path_flops_total",
               "FLOPs of RAG requests with parallel paths counted once.", rag_critical_flops_,
               &out);
  FloatCounter("superpose_rag_naive_flops_total",
               "FLOPs the same RAG requests would cost as flat (naive) prompts.", rag_naive_flops_,
               &out);
  if (engine_ != nullptr) {
    const engine::EngineStats s = engine_->stats();
    Gauge("superpose_running_sequences", "Sequences in the running batch.", s.running, &out);
    Gauge("superpose_waiting_sequences", "Sequences waiting to be scheduled.", s.waiting, &out);
    Gauge("superpose_kv_blocks_total", "KV cache blocks in the pool.", s.kv_blocks_total, &out);
    Gauge("superpose_kv_blocks_used", "KV cache blocks referenced by sequences.",
          s.kv_blocks_total - s.kv_blocks_free, &out);
    Gauge("superpose_kv_blocks_free", "KV cache blocks not referenced (incl. evictable cached).",
          s.kv_blocks_free, &out);
    Counter("superpose_rag_path_cache_hits_total", "Path-cache lookups that found the document.",
            static_cast<uint64_t>(s.path_cache_hits), &out);
    Counter("superpose_rag_path_cache_misses_total", "Path-cache lookups that computed it.",
            static_cast<uint64_t>(s.path_cache_misses), &out);
    Gauge("superpose_kv_blocks_cached", "KV cache blocks holding reusable prefix content.",
          s.kv_blocks_cached, &out);
  }
  if (adapters_ != nullptr) {
    const engine::AdapterCounters a = adapters_->counters();
    Gauge("superpose_adapters_resident", "LoRA adapters loaded in the backend.", a.resident, &out);
    Gauge("superpose_adapters_resident_bytes", "Float32 bytes of the resident adapters' A and B.",
          a.resident_bytes, &out);
    Counter("superpose_adapter_loads_total", "LoRA adapter loads (additions and reloads).",
            static_cast<uint64_t>(a.loads), &out);
    Counter("superpose_adapter_evictions_total", "LoRA adapters evicted to make room.",
            static_cast<uint64_t>(a.evictions), &out);
  }
  return out;
}

}  // namespace superpose::server
