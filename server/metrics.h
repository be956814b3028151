// Prometheus metrics: the engine reports through EngineObserver; an HTTP endpoint on
// its own port serves them in the text exposition format (/metrics).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/runtime/engine.h"

namespace httplib {
class Server;
}

namespace superpose::server {

class TlsCertStore;

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);
  // Appends the _bucket/_sum/_count lines of `name`.
  void Render(const std::string& name, std::string* out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket (not cumulative), last = +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics : public engine::EngineObserver {
 public:
  Metrics();
  void SetEngine(const engine::Engine* engine) { engine_ = engine; }
  // LoRA adapters (superpose_adapters_*); before serving.
  void SetAdapters(const engine::AdapterManager* adapters) { adapters_ = adapters; }

  void OnFinished(const engine::Usage& usage, engine::FinishReason reason,
                  const absl::Status& status) override;
  void OnFirstToken(double queue_time_ms, double ttft_ms) override;
  void OnToken(double inter_token_ms) override;
  void OnPreempted() override;
  void OnStep(int32_t running, int32_t waiting, int32_t batch_tokens) override;
  void OnRagFinished(const engine::rag::Result& result) override;
  void OnTenantFinished(const std::string& tenant, const engine::Usage& usage,
                        engine::FinishReason reason, const absl::Status& status) override;
  void OnQueueTimeout(const std::string& tenant) override;
  void OnLazyPrefill(int64_t prompt_tokens, int64_t pruned_tokens) override;
  void OnLazyRevived(int64_t tokens) override;
  // Requests refused before reaching the engine (validation, full queue); `tenant`
  // (empty: unknown, e.g. not authenticated) also counts them for the tenant.
  void OnRejected(const std::string& code, const std::string& tenant = "");

  std::string Render() const;

 private:
  mutable absl::Mutex mu_;
  const engine::Engine* engine_ = nullptr;
  const engine::AdapterManager* adapters_ = nullptr;
  Histogram queue_time_s_ ABSL_GUARDED_BY(mu_);
  Histogram ttft_s_ ABSL_GUARDED_BY(mu_);
  Histogram itl_s_ ABSL_GUARDED_BY(mu_);
  Histogram e2e_s_ ABSL_GUARDED_BY(mu_);
  Histogram batch_tokens_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> finished_ ABSL_GUARDED_BY(mu_);  // by finish reason
  std::map<std::string, uint64_t> rejected_ ABSL_GUARDED_BY(mu_);  // by gRPC code
  uint64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t generated_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cached_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t preemptions_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lazy_prefills_ ABSL_GUARDED_BY(mu_) = 0;  // LazyLLM
  uint64_t lazy_pruned_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lazy_revived_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t steps_ ABSL_GUARDED_BY(mu_) = 0;
  // RAG requests.
  std::map<std::string, uint64_t> rag_requests_ ABSL_GUARDED_BY(mu_);  // by mode
  uint64_t rag_paths_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rag_paths_pruned_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rag_path_cache_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rag_pruned_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  double rag_flops_ ABSL_GUARDED_BY(mu_) = 0;
  double rag_critical_flops_ ABSL_GUARDED_BY(mu_) = 0;
  double rag_naive_flops_ ABSL_GUARDED_BY(mu_) = 0;
  // By tenant (tenant names only: never keys).
  struct TenantCounters {
    std::map<std::string, uint64_t> finished;  // by finish reason
    std::map<std::string, uint64_t> rejected;  // by gRPC code
    uint64_t prompt_tokens = 0;
    uint64_t generated_tokens = 0;
    uint64_t cached_tokens = 0;
    double queue_seconds = 0;  // of finished requests
    uint64_t queued = 0;
  };
  std::map<std::string, TenantCounters> tenants_ ABSL_GUARDED_BY(mu_);
  void RenderTenants(std::string* out) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
};

// Serves GET /metrics (and /healthz) on `listen` (host:port; port 0 picks one); see
// server/metrics_server.cc for the connection limits that keep it answering.
class MetricsServer {
 public:
  explicit MetricsServer(const Metrics* metrics);
  ~MetricsServer();
  // Returns the bound port, or -1 (the port is taken, or the address is not local).
  int Start(const std::string& listen);
  void Stop();
  // /healthz answers 503 with the reason while `health` is not OK (before Start).
  void set_health(std::function<absl::Status()> health) { health_ = std::move(health); }
  // HTTPS with this certificate (before Start); with a client CA, /metrics needs a
  // verified client certificate (/healthz does not). nullptr: plain HTTP.
  void set_tls(TlsCertStore* tls) { tls_ = tls; }
  // /metrics needs an "Authorization" header that `authorize` accepts (before Start).
  void set_authorizer(std::function<bool(const std::string&)> authorize) {
    authorize_ = std::move(authorize);
  }

 private:
  const Metrics* metrics_;
  std::function<absl::Status()> health_;
  TlsCertStore* tls_ = nullptr;
  std::function<bool(const std::string&)> authorize_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
};

}  // namespace superpose::server
