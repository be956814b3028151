// superpose-server: serves one model over gRPC. See docs/operations.md for the flags.
#include <signal.h>

#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "engine/backend.h"
#include "engine/cpu/blas_setup.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "engine/simd.h"
#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif
#include "server/adapter_service.h"
#include "server/chat_prompt.h"
#include "server/health_reflection.h"
#include "server/lazy_options.h"
#include "server/metrics.h"
#include "server/omp_wait.h"
#include "server/openai_server.h"
#include "server/private_mode.h"
#include "server/reflection_auth.h"
#include "server/reload.h"
#include "server/request_bounds.h"
#include "server/service.h"
#include "server/shutdown.h"
#include "server/tenant_limits.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"

ABSL_FLAG(std::string, model, "",
          "Hugging Face model directory (config.json, *.safetensors, tokenizer.json). "
          "Empty: the small built-in demo model, whose text is meaningless.");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC listen address host:port (port 0 picks a free one; see --port_file)");
ABSL_FLAG(std::string, port_file, "", "If set, write the bound gRPC port to this file");
ABSL_FLAG(std::string, backend, "auto",
          "Compute backend: auto (cuda when a GPU is usable, else cpu), cpu, cuda");
ABSL_FLAG(int32_t, tp, 1,
          "Tensor-parallel ranks (CPU: threads with a shared-memory all-reduce; CUDA: GPUs "
          "0..tp-1 with NCCL)");
ABSL_FLAG(double, gpu_memory_fraction, 0.0,
          "CUDA: fraction of GPU memory for weights + KV cache; when > 0 (and --kv_blocks is "
          "0) the KV cache takes the rest of it instead of --kv_cache_mb");
ABSL_FLAG(bool, cuda_split_decode, true,
          "CUDA: decode steps with fewer (sequence, kv head) pairs than the GPU has SMs split "
          "each context over several blocks (split-K attention) and merge them");
ABSL_FLAG(bool, cuda_row_sampling, true,
          "CUDA: draw the tokens of temperature requests without top-k or penalties on the "
          "GPU (exponential race) instead of copying their whole logits rows to the host");
ABSL_FLAG(bool, cuda_graphs, true,
          "CUDA: replay decode steps (every sequence one new token, batch <= 64, no "
          "log-probabilities) from CUDA graphs captured per batch size; not with --tp > 1");
ABSL_FLAG(std::string, cuda_attention, "auto",
          "CUDA: attention of prefill steps: auto (tensor cores when head_dim is a multiple "
          "of 16 up to 128, else simt), simt (float32 kernel) or tensor_core");
ABSL_FLAG(std::string, cuda_dtype, "auto",
          "CUDA: projection weights in GPU memory: auto (a quantized checkpoint's int8/q4, "
          "else bf16) | bf16 | int8 | q4 (kept quantized, dequantizing GEMM kernels; a float "
          "checkpoint is quantized at load)");
ABSL_FLAG(std::string, cpu_dtype, "auto",
          "CPU backend weight type: auto (a quantized checkpoint's int8/q4; bfloat16 for bf16 "
          "checkpoints, on every CPU; else float32) | float32 | bfloat16 | int8 | q4 (int8 "
          "per channel / 4-bit palettized, quantized at load; see superpose-quantize)");
ABSL_FLAG(std::string, kv_cache_dtype, "auto",
          "KV cache element type: auto (CPU: bfloat16 when the weights run in bfloat16, else "
          "float32; CUDA: bfloat16) | float32 (CPU only) | bfloat16");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for the backend (0: all cores)");
ABSL_FLAG(std::string, simd, "auto",
          "CPU kernels: cap the SIMD target (auto: the best this CPU has; or one of the "
          "targets it supports, e.g. avx2, sse4); logged as simd=");
ABSL_FLAG(int32_t, max_batch_tokens, 512, "New tokens per engine step (decode + prefill chunks)");
ABSL_FLAG(int32_t, max_running, 64, "Sequences in the running batch");
ABSL_FLAG(int32_t, max_waiting, 256,
          "Queued requests; beyond it new requests get RESOURCE_EXHAUSTED at once");
ABSL_FLAG(int32_t, max_context, 0, "Context window in tokens (0: the model's maximum)");
ABSL_FLAG(int32_t, default_max_new_tokens, 256, "max_new_tokens when a request sets none");
ABSL_FLAG(int32_t, kv_block_size, 16, "Tokens per KV cache block");
ABSL_FLAG(int64_t, kv_cache_mb, 512, "Memory for the KV cache, in MiB");
ABSL_FLAG(int32_t, kv_blocks, 0, "KV cache blocks (overrides --kv_cache_mb when > 0)");
ABSL_FLAG(bool, prefix_caching, true, "Reuse KV blocks of identical prompt prefixes");
ABSL_FLAG(int32_t, rag_max_documents, 64, "Most documents one GenerateRag request may carry");
ABSL_FLAG(double, shutdown_grace_s, 10.0,
          "On SIGTERM/SIGINT: seconds running requests may take to finish");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9090",
          "Prometheus /metrics HTTP address host:port (empty: off; port 0 picks one)");
ABSL_FLAG(std::string, metrics_port_file, "", "If set, write the bound metrics port here");
ABSL_FLAG(std::string, api_keys_file, "",
          "File of '<key> <tenant> [name=value ...]' lines: clients must send "
          "'authorization: Bearer <key>'; the tenant scopes the prefix cache and has the "
          "limits given (docs/operations.md \"Tenants\"). Empty: no auth, tenant \"default\"");
// Tenants (docs/operations.md "Tenants"; the limits themselves are in --api_keys_file).
ABSL_FLAG(int32_t, tenant_max_waiting, -1,
          "Queued requests per tenant for tenants whose key line sets no max_queued: > 0 that "
          "bound, 0 none (only --max_waiting), -1 half of --max_waiting when --api_keys_file "
          "names several tenants");
ABSL_FLAG(int64_t, max_queue_ms, 0,
          "A request not admitted within this many ms gets RESOURCE_EXHAUSTED with a "
          "retry-after-ms hint (0: no bound)");
// Transport security and authentication (docs/operations.md).
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the server (with --tls_key): TLS on the gRPC port and, "
          "unless --metrics_tls=false, the metrics port. Re-read on SIGHUP and on change");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert (unencrypted)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA certificates: clients must present a certificate signed by one (mutual TLS)");
ABSL_FLAG(bool, metrics_tls, true, "With --tls_cert: serve the metrics port over HTTPS too");
ABSL_FLAG(int32_t, tls_reload_interval_s, 30,
          "Check the TLS files for changes this often and reload them (0: only on SIGHUP)");
ABSL_FLAG(bool, tenant_from_client_cert, false,
          "With --tls_client_ca: a request's tenant is its client certificate's subject CN");
ABSL_FLAG(bool, auth_metrics, false,
          "/metrics needs 'Authorization: Bearer <key>' too (needs --api_keys_file)");
ABSL_FLAG(bool, auth_reflection, false,
          "gRPC server reflection needs an API key too (needs --api_keys_file)");
ABSL_FLAG(std::string, log_level, "info", "trace|debug|info|warn|error");
// Private mode and shutdown: docs/operations.md "Private mode", "Shutdown".
ABSL_FLAG(bool, private, false,
          "Private mode: prefix and RAG path caches off, KV blocks zeroed when freed, "
          "request ids hashed in logs, no core dumps");
// Request bounds (docs/operations.md, "Request bounds").
ABSL_FLAG(int32_t, max_bytes_per_token, 32,
          "Bytes one token may stand for: --max_text_bytes defaults to this times the context "
          "window");
ABSL_FLAG(int64_t, max_text_bytes, 0,
          "Most bytes of one text field (prompt, document, preamble, query, postamble, Tokenize "
          "text), checked before tokenizing (0: context window * --max_bytes_per_token)");
ABSL_FLAG(int64_t, max_request_bytes, 0,
          "Most bytes of one request message (0: 4 * max_text_bytes + 64 KiB)");
// LazyLLM (docs/operations.md "LazyLLM token pruning").
ABSL_FLAG(std::string, lazy_default, "off",
          "LazyLLM pruning of plain requests that do not choose: off, paper (the paper's "
          "schedule), or LAYER:KEEP,... (0-based boundary layers, keep fractions)");
ABSL_FLAG(int32_t, lazy_min_prompt, 1024,
          "Prompts shorter than this many tokens never prune (LazyLLM)");
ABSL_FLAG(int64_t, lazy_aux_mb, 256,
          "MiB the running sequences' LazyLLM Aux Caches may hold (per tensor-parallel rank); a "
          "sequence past it decodes without revival");
ABSL_FLAG(bool, lazy_revive, false,
          "LazyLLM decode-time revival for pruning requests that do not set lazy.revive: each "
          "decode step reselects every stage's tokens and revives pruned ones from the Aux "
          "Cache (false: the prefill's decision is kept, the paper's TTFT mode)");
ABSL_FLAG(int32_t, tokenize_threads, 2, "Threads that tokenize requests, off the gRPC threads");
ABSL_FLAG(int32_t, tokenize_queue, 64,
          "Requests that may wait for a tokenize thread; more get RESOURCE_EXHAUSTED");
// The OpenAI-compatible HTTP API (docs/api.md "HTTP API", docs/operations.md).
ABSL_FLAG(std::string, http_listen, "",
          "OpenAI-compatible HTTP API address host:port (/v1/models, /v1/completions, "
          "/v1/chat/completions; port 0 picks one). Empty: off");
ABSL_FLAG(std::string, http_port_file, "", "If set, write the bound HTTP API port here");
ABSL_FLAG(int32_t, http_threads, 64,
          "HTTP API connections served at once (a streaming response holds one)");
ABSL_FLAG(std::string, chat_template, "",
          "Jinja chat template file for chat requests, overriding the model's "
          "tokenizer_config.json chat_template");
// LoRA adapters (docs/operations.md "LoRA adapters").
ABSL_FLAG(std::string, adapters, "",
          "LoRA adapters to serve from start-up: name=DIR[,name2=DIR2...] (PEFT directories: "
          "adapter_config.json + adapter_model.safetensors); requests pick one by adapter_id");
ABSL_FLAG(int32_t, max_adapters, 8,
          "LoRA adapters loaded in the backend at once; beyond, the least recently used one "
          "that no running request holds is evicted (and reloaded from its directory on use)");
ABSL_FLAG(std::string, admin_tenants, "admin",
          "With --api_keys_file: comma-separated tenants whose keys may call the "
          "SuperposeAdmin rpcs (LoadAdapter, UnloadAdapter, ListAdapters)");

namespace {

using namespace superpose;  // NOLINT

void WritePortFile(const std::string& path, int port) {
  if (path.empty()) return;
  std::ofstream(path + ".tmp") << port << "\n";
  std::rename((path + ".tmp").c_str(), path.c_str());
}

// The backend-specific flags set to other than their defaults, for the backend's parser
// (the others keep the backend's defaults, the same values; a flag of another backend is
// an error there).
engine::BackendFlags GivenBackendFlags() {
  engine::BackendFlags flags;
  for (const absl::CommandLineFlag* f : {&absl::GetFlagReflectionHandle(FLAGS_cpu_dtype),
                                         &absl::GetFlagReflectionHandle(FLAGS_kv_cache_dtype),
                                         &absl::GetFlagReflectionHandle(FLAGS_cuda_split_decode),
                                         &absl::GetFlagReflectionHandle(FLAGS_cuda_row_sampling),
                                         &absl::GetFlagReflectionHandle(FLAGS_cuda_graphs),
                                         &absl::GetFlagReflectionHandle(FLAGS_cuda_attention),
                                         &absl::GetFlagReflectionHandle(FLAGS_cuda_dtype)}) {
    const std::string value = f->CurrentValue();
    if (value != f->DefaultValue()) flags[std::string(f->Name())] = value;
  }
  return flags;
}

engine::BackendOptions CommonBackendOptions() {
  engine::BackendOptions o;
  o.num_threads = absl::GetFlag(FLAGS_threads);
  o.tensor_parallel = absl::GetFlag(FLAGS_tp);
  o.kv_block_size = absl::GetFlag(FLAGS_kv_block_size);
  o.kv_num_blocks = absl::GetFlag(FLAGS_kv_blocks);
  o.kv_memory_bytes = absl::GetFlag(FLAGS_kv_cache_mb) << 20;
  o.device_memory_fraction = absl::GetFlag(FLAGS_gpu_memory_fraction);
  return o;
}

// The backend --backend names (auto resolved), its options parsed and checked: before
// the model is read, so that a bad flag fails startup at once, naming the flag.
absl::StatusOr<engine::BackendRegistry::Config> ConfigureBackend(
    const engine::BackendRegistry& registry) {
  std::string name = absl::GetFlag(FLAGS_backend);
#if SUPERPOSE_HAVE_CUDA
  std::string no_gpu;
  if (name == "auto") name = cuda::CudaAvailable(&no_gpu) ? "cuda" : "cpu";
  if (!no_gpu.empty()) spdlog::info("--backend=auto: no usable GPU ({}), using cpu", no_gpu);
#else
  if (name == "auto") name = "cpu";
  if (name == "cuda") {
    return absl::InvalidArgumentError(
        "--backend=cuda: this build has no CUDA backend (built without nvcc)");
  }
#endif
  return registry.Configure(name, CommonBackendOptions(), GivenBackendFlags());
}

// The request bounds for a context window of `context_length` tokens.
absl::StatusOr<server::RequestBounds> RequestBoundsFromFlags(int32_t context_length) {
  if (absl::GetFlag(FLAGS_tokenize_threads) < 1 || absl::GetFlag(FLAGS_tokenize_queue) < 0) {
    return absl::InvalidArgumentError("--tokenize_threads must be >= 1, --tokenize_queue >= 0");
  }
  server::BoundsConfig c;
  c.max_bytes_per_token = absl::GetFlag(FLAGS_max_bytes_per_token);
  c.max_text_bytes = absl::GetFlag(FLAGS_max_text_bytes);
  c.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  return server::DeriveRequestBounds(context_length, c);
}

// The security flags that only make sense together; a message naming them, or "".
std::string SecurityFlagsError() {
  const bool keys = !absl::GetFlag(FLAGS_api_keys_file).empty();
  const bool cert = !absl::GetFlag(FLAGS_tls_cert).empty();
  if (cert != !absl::GetFlag(FLAGS_tls_key).empty()) {
    return "--tls_cert and --tls_key go together: give both or neither";
  }
  if (!cert && !absl::GetFlag(FLAGS_tls_client_ca).empty()) {
    return "--tls_client_ca needs --tls_cert and --tls_key";
  }
  if (absl::GetFlag(FLAGS_tenant_from_client_cert) && absl::GetFlag(FLAGS_tls_client_ca).empty()) {
    return "--tenant_from_client_cert needs --tls_client_ca (mutual TLS)";
  }
  if (absl::GetFlag(FLAGS_auth_metrics) && !keys) return "--auth_metrics needs --api_keys_file";
  if (absl::GetFlag(FLAGS_auth_reflection) && !keys) {
    return "--auth_reflection needs --api_keys_file";
  }
  return "";
}

// The TLS files, checked (nullptr without --tls_cert); reloaded on SIGHUP and on change.
absl::StatusOr<std::unique_ptr<server::TlsCertStore>> SetUpTls(server::ReloadHooks* reload) {
  if (absl::GetFlag(FLAGS_tls_cert).empty()) return nullptr;
  auto tls =
      server::TlsCertStore::Create({absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
                                    absl::GetFlag(FLAGS_tls_client_ca)});
  if (!tls.ok()) return tls.status();
  server::TlsCertStore* t = tls->get();
  reload->Add("tls", [t] { return t->Reload(); });
  t->WatchFiles(absl::Seconds(absl::GetFlag(FLAGS_tls_reload_interval_s)));
  return tls;
}

// Logs a startup failure (its message names the flag) and gives the exit status.
int Fail(const absl::Status& st) {
  spdlog::critical("{}", std::string(st.message()));
  return 2;
}

absl::Status Prefixed(absl::string_view prefix, const absl::Status& st) {
  return absl::Status(st.code(), absl::StrCat(prefix, st.ToString()));
}

// Identity: API keys and TLS certificates (both reloaded on SIGHUP).
struct Security {
  server::ReloadHooks reload;
  server::Authenticator auth;
  std::unique_ptr<server::TlsCertStore> tls;  // null: plaintext
};

absl::Status SetUpSecurity(Security* sec) {
  if (const std::string e = SecurityFlagsError(); !e.empty()) {
    return absl::InvalidArgumentError(e);
  }
  if (const std::string f = absl::GetFlag(FLAGS_api_keys_file); !f.empty()) {
    absl::StatusOr<server::Authenticator> a = server::Authenticator::FromFile(f);
    if (!a.ok()) return Prefixed("--api_keys_file: ", a.status());
    sec->auth = *std::move(a);
  }
  sec->auth.set_tenant_from_client_cert(absl::GetFlag(FLAGS_tenant_from_client_cert));
  absl::StatusOr<std::unique_ptr<server::TlsCertStore>> tls = SetUpTls(&sec->reload);
  if (!tls.ok()) return tls.status();
  sec->tls = *std::move(tls);
  return absl::OkStatus();
}

// The model's weights in the configured backend (private mode: its KV pool zeroed).
absl::StatusOr<std::unique_ptr<engine::Backend>> LoadBackend(
    const engine::BackendRegistry& registry, const engine::BackendRegistry::Config& config,
    const engine::ModelBundle& model, bool private_mode) {
  absl::StatusOr<std::unique_ptr<engine::Backend>> backend = registry.Create(config);
  if (!backend.ok()) return Prefixed("--backend: ", backend.status());
  if (absl::Status st = (*backend)->Load(model.config, *model.weights, engine::Shard{}); !st.ok()) {
    return Prefixed("cannot load weights: ", st);
  }
  if (private_mode) {
    if (absl::Status st = (*backend)->ZeroKvBlocks({}); !st.ok()) {
      return Prefixed("--private: ", st);
    }
    spdlog::info("{}", server::PrivateModeLine());
  }
  const engine::KvPoolInfo kv = (*backend)->kv();
  spdlog::info(
      "backend={} compute_dtype={} blas_core={} simd={} bf16_kernel={} attention_kernel={} "
      "omp_wait={} tp={} kv_dtype={} kv_blocks={} block_size={} kv_mib={:.1f}",
      (*backend)->name(), (*backend)->compute_dtype(), engine::cpu::BlasCoreName(),
      engine::simd::ActiveTargetName(), engine::cpu::Bf16GemmKernelName(),
      engine::cpu::AttnKernelName(), omp_wait::Describe(), config.options().tensor_parallel,
      kv.dtype, kv.num_blocks, kv.block_size, kv.num_blocks * kv.bytes_per_block / 1048576.0);
  return backend;
}

absl::StatusOr<engine::EngineOptions> EngineOptionsFromFlags(bool private_mode) {
  engine::EngineOptions eopts;
  eopts.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  eopts.max_running = absl::GetFlag(FLAGS_max_running);
  eopts.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  eopts.max_context = absl::GetFlag(FLAGS_max_context);
  eopts.prefix_caching = absl::GetFlag(FLAGS_prefix_caching);
  eopts.rag_max_documents = absl::GetFlag(FLAGS_rag_max_documents);
  eopts.private_mode = private_mode;
  eopts.max_queue_ms = absl::GetFlag(FLAGS_max_queue_ms);
  if (eopts.max_queue_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_queue_ms: must be >= 0, got ", eopts.max_queue_ms));
  }
  absl::StatusOr<engine::LazyOptions> lazy =
      server::ParseLazyDefault(absl::GetFlag(FLAGS_lazy_default));
  if (!lazy.ok()) return lazy.status();
  eopts.lazy.default_schedule = *lazy;
  eopts.lazy.default_schedule.revive = absl::GetFlag(FLAGS_lazy_revive);
  if (absl::GetFlag(FLAGS_lazy_aux_mb) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lazy_aux_mb: must be >= 0, got ", absl::GetFlag(FLAGS_lazy_aux_mb)));
  }
  eopts.lazy.aux_budget_bytes = absl::GetFlag(FLAGS_lazy_aux_mb) << 20;
  eopts.lazy.min_prompt = absl::GetFlag(FLAGS_lazy_min_prompt);
  if (eopts.lazy.min_prompt < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--lazy_min_prompt: must be >= 1, got ", eopts.lazy.min_prompt));
  }
  return eopts;
}

// The engine's tenant limits from the key file, now and after each SIGHUP reload.
void ApplyTenantPolicies(Security* sec, engine::Engine* eng, int32_t max_waiting) {
  eng->SetTenantPolicies(server::EnginePolicies(
      sec->auth.tenant_policies(), absl::GetFlag(FLAGS_tenant_max_waiting), max_waiting));
  if (!sec->auth.enabled()) return;
  server::Authenticator* auth = &sec->auth;
  sec->reload.Add("api_keys_file", [auth, eng, max_waiting] {
    absl::StatusOr<std::string> r = auth->Reload();  // the new keys, then their limits
    if (r.ok()) {
      eng->SetTenantPolicies(server::EnginePolicies(
          auth->tenant_policies(), absl::GetFlag(FLAGS_tenant_max_waiting), max_waiting));
    }
    return r;
  });
}

// Starts /metrics and /healthz when --metrics_listen is set.
absl::Status StartMetrics(server::MetricsServer* metrics_server, engine::Engine* eng,
                          Security* sec) {
  metrics_server->set_health([eng] { return eng->Health(); });
  const bool https = sec->tls != nullptr && absl::GetFlag(FLAGS_metrics_tls);
  if (https) metrics_server->set_tls(sec->tls.get());
  if (absl::GetFlag(FLAGS_auth_metrics)) {
    const server::Authenticator* auth = &sec->auth;
    metrics_server->set_authorizer(
        [auth](const std::string& h) { return auth->TenantOfAuthorization(h).ok(); });
  }
  const std::string ml = absl::GetFlag(FLAGS_metrics_listen);
  if (ml.empty()) return absl::OkStatus();
  const int mport = metrics_server->Start(ml);
  if (mport <= 0) {
    return absl::UnavailableError(
        absl::StrCat("--metrics_listen: cannot listen on ", ml, " (is the port in use?)"));
  }
  spdlog::info("metrics on {}://{}/metrics (port {})", https ? "https" : "http", ml, mport);
  WritePortFile(absl::GetFlag(FLAGS_metrics_port_file), mport);
  return absl::OkStatus();
}

// The OpenAI-compatible HTTP API, when --http_listen is set: its chat template and
// server (stopped after the drain, which its calls take part in through the gate).
struct HttpApi {
  server::ChatPrompter chat = server::ChatPrompter::Without("");
  const engine::AdapterManager* adapters = nullptr;  // `model` may name one
  std::unique_ptr<server::OpenAiServer> server;
};

// The chat template (--chat_template, else the model's) for gRPC's `messages` and the
// HTTP API's chat.
absl::Status LoadChat(HttpApi* api, const engine::ModelBundle& model,
                      server::SuperposeService* service) {
  absl::StatusOr<server::ChatPrompter> chat = server::ChatPrompter::Load(
      absl::GetFlag(FLAGS_chat_template), absl::GetFlag(FLAGS_model), *model.tokenizer);
  if (!chat.ok()) return Prefixed("--chat_template: ", chat.status());
  api->chat = *std::move(chat);
  service->set_chat(&api->chat);
  return absl::OkStatus();
}

absl::Status StartHttpApi(HttpApi* api, const engine::ModelBundle& model, engine::Engine* eng,
                          const server::Limits& limits, server::Metrics* metrics, Security* sec,
                          server::WorkPool* pool, server::SuperposeService* service,
                          int64_t max_request_bytes) {
  const std::string listen = absl::GetFlag(FLAGS_http_listen);
  if (listen.empty()) return absl::OkStatus();
  if (absl::GetFlag(FLAGS_tenant_from_client_cert)) {
    return absl::InvalidArgumentError(
        "--http_listen: the HTTP API takes tenants from bearer keys only, not with "
        "--tenant_from_client_cert");
  }
  server::OpenAiServerOptions options;
  options.threads = absl::GetFlag(FLAGS_http_threads);
  options.max_request_bytes = max_request_bytes;
  if (options.threads < 1) return absl::InvalidArgumentError("--http_threads: must be >= 1");
  api->server = std::make_unique<server::OpenAiServer>(&model, eng, limits, &api->chat, metrics,
                                                       &sec->auth, pool, service->gate(), options);
  if (sec->tls != nullptr) api->server->set_tls(sec->tls.get());
  api->server->set_adapters(api->adapters);
  const int port = api->server->Start(listen);
  if (port <= 0) {
    return absl::UnavailableError(
        absl::StrCat("--http_listen: cannot listen on ", listen, " (is the port in use?)"));
  }
  spdlog::info("HTTP API on {}://{}/v1 (port {}, chat {})", sec->tls ? "https" : "http", listen,
               port, api->chat.available() ? "on" : "off");
  WritePortFile(absl::GetFlag(FLAGS_http_port_file), port);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpc(server::SuperposeService* service,
                                                        grpc::Service* admin, Security* sec,
                                                        int64_t max_request_bytes) {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  server::RegisterHealthForReflection();  // grpcurl can describe and call Health
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(
      absl::GetFlag(FLAGS_listen),
      sec->tls != nullptr ? sec->tls->GrpcCredentials() : grpc::InsecureServerCredentials(), &port);
  if (absl::GetFlag(FLAGS_auth_reflection)) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> icpt;
    icpt.push_back(std::make_unique<server::ReflectionAuthFactory>(&sec->auth));
    builder.experimental().SetInterceptorCreators(std::move(icpt));
  }
  builder.RegisterService(service);
  builder.RegisterService(admin);
  builder.SetMaxReceiveMessageSize(static_cast<int>(max_request_bytes));
  // A second server on the same port must fail, not share the port silently.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat(
        "--listen: cannot listen on ", absl::GetFlag(FLAGS_listen), " (is the port in use?)"));
  }
  server::SetServing(server.get(), true);
  spdlog::info("listening on {} (port {}, {})", absl::GetFlag(FLAGS_listen), port,
               sec->tls == nullptr  ? "plaintext"
               : sec->tls->mutual() ? "mutual TLS"
                                    : "TLS");
  WritePortFile(absl::GetFlag(FLAGS_port_file), port);
  return server;
}

// Waits for SIGTERM / SIGINT (blocked in every thread; see main) and returns it; SIGHUP
// runs the reload hooks. Meanwhile a backend that can no longer run steps (a
// tensor-parallel group aborted after a rank failed) turns the gRPC health status to
// NOT_SERVING, so that an orchestrator restarts the server.
int WaitForStop(grpc::Server* server, const engine::Engine& eng, server::ReloadHooks* reload) {
  absl::Notification stop_watch;
  std::thread watcher([&] {
    while (!stop_watch.WaitForNotificationWithTimeout(absl::Seconds(1))) {
      const absl::Status h = eng.Health();
      if (h.ok()) continue;
      spdlog::critical("backend failed, reporting NOT_SERVING: {}", h.ToString());
      server::SetServing(server, false);
      return;
    }
  });
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  int sig = 0;
  while (sigwait(&set, &sig) == 0 && sig == SIGHUP) {
    spdlog::info("SIGHUP: reloading");
    reload->RunAll();
  }
  stop_watch.Notify();
  watcher.join();
  return sig;
}

int Run() {
  spdlog::set_level(spdlog::level::from_str(absl::GetFlag(FLAGS_log_level)));
  const bool private_mode = absl::GetFlag(FLAGS_private);
  if (private_mode) {
    if (absl::Status st = server::EnterPrivateMode(); !st.ok()) {
      return Fail(Prefixed("--private: ", st));
    }
  }
  if (absl::Status st = engine::simd::LimitTargets(absl::GetFlag(FLAGS_simd)); !st.ok()) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--simd: ", st.message())));
  }
  engine::BackendRegistry registry;
  engine::cpu::RegisterBackend(registry);
#if SUPERPOSE_HAVE_CUDA
  cuda::RegisterBackend(registry);
#endif
  // Every flag is checked before the model is read, so that a bad one fails at once.
  absl::StatusOr<engine::BackendRegistry::Config> backend_config = ConfigureBackend(registry);
  if (!backend_config.ok()) return Fail(backend_config.status());
  Security sec;
  if (absl::Status st = SetUpSecurity(&sec); !st.ok()) return Fail(st);
  absl::StatusOr<engine::EngineOptions> eopts = EngineOptionsFromFlags(private_mode);
  if (!eopts.ok()) return Fail(eopts.status());

  absl::StatusOr<engine::ModelBundle> model = engine::LoadModelBundle(absl::GetFlag(FLAGS_model));
  if (!model.ok()) return Fail(Prefixed("cannot load model: ", model.status()));
  if (model->builtin) {
    spdlog::warn(
        "no --model given: serving the built-in demo model (random weights, "
        "byte-level tokenizer); its text is meaningless");
  }
  const engine::ModelConfig& cfg = model->config;
  if (absl::Status st = server::CheckLazyDefault(eopts->lazy.default_schedule, cfg.num_layers);
      !st.ok()) {
    return Fail(st);
  }
  spdlog::info("model={} arch={} layers={} hidden={} heads={}/{} vocab={} params={} dtype={}",
               model->name, cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
               cfg.num_kv_heads, cfg.vocab_size, cfg.NumParameters(), engine::DTypeName(cfg.dtype));
  absl::StatusOr<std::unique_ptr<engine::Backend>> backend =
      LoadBackend(registry, *backend_config, *model, private_mode);
  if (!backend.ok()) return Fail(backend.status());

  if (absl::GetFlag(FLAGS_max_adapters) < 1) {
    return Fail(absl::InvalidArgumentError("--max_adapters: must be >= 1"));
  }
  // Outlives the engine (its requests hold adapters).
  engine::AdapterManager adapters(backend->get(), cfg, absl::GetFlag(FLAGS_max_adapters));
  if (absl::Status st = server::AddFlagAdapters(&adapters, absl::GetFlag(FLAGS_adapters));
      !st.ok()) {
    return Fail(st);
  }
  engine::Engine eng(*eopts, cfg, model->tokenizer.get(), backend->get());
  eng.SetAdapters(&adapters);
  ApplyTenantPolicies(&sec, &eng, eopts->max_waiting);
  server::Metrics metrics;
  metrics.SetEngine(&eng);
  metrics.SetAdapters(&adapters);
  eng.SetObserver(&metrics);
  eng.Start();
  server::MetricsServer metrics_server(&metrics);
  if (absl::Status st = StartMetrics(&metrics_server, &eng, &sec); !st.ok()) return Fail(st);

  server::Limits limits;
  limits.context_length = eng.context_length();
  limits.vocab_size = cfg.vocab_size;
  limits.default_max_new_tokens = absl::GetFlag(FLAGS_default_max_new_tokens);
  limits.max_rag_documents = absl::GetFlag(FLAGS_rag_max_documents);
  absl::StatusOr<server::RequestBounds> bounds = RequestBoundsFromFlags(limits.context_length);
  if (!bounds.ok()) return Fail(bounds.status());
  limits.max_text_bytes = bounds->max_text_bytes;
  // Outlives the gRPC server: its work finishes calls that Shutdown() waits for.
  server::WorkPool tokenize_pool(absl::GetFlag(FLAGS_tokenize_threads),
                                 absl::GetFlag(FLAGS_tokenize_queue));
  spdlog::info(
      "request bounds: max_text_bytes={} max_request_bytes={} tokenize_threads={} "
      "tokenize_queue={}",
      bounds->max_text_bytes, bounds->max_request_bytes, tokenize_pool.threads(),
      tokenize_pool.max_queued());
  server::SuperposeService service(
      &*model, &eng, (*backend)->name(), (*backend)->compute_dtype(), (*backend)->kv().dtype,
      backend_config->options().tensor_parallel, limits, &metrics, &sec.auth, &tokenize_pool);
  HttpApi http_api;
  http_api.adapters = &adapters;
  server::AdapterAdminService admin(&adapters, &sec.auth, absl::GetFlag(FLAGS_admin_tenants));
  if (absl::Status st = LoadChat(&http_api, *model, &service); !st.ok()) return Fail(st);
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartGrpc(&service, &admin, &sec, bounds->max_request_bytes);
  if (!server.ok()) return Fail(server.status());
  if (absl::Status st = StartHttpApi(&http_api, *model, &eng, limits, &metrics, &sec,
                                     &tokenize_pool, &service, bounds->max_request_bytes);
      !st.ok()) {
    return Fail(st);
  }

  const int sig = WaitForStop(server->get(), eng, &sec.reload);
  const double grace = absl::GetFlag(FLAGS_shutdown_grace_s);
  spdlog::info("signal {}: draining for up to {:.1f}s", sig, grace);
  server::DrainAndStop(server->get(), &service, &eng, absl::Seconds(grace));
  // Work still queued finishes its calls (cancelled ones at once) while the service
  // and the engine are alive.
  if (http_api.server != nullptr) http_api.server->Stop();
  tokenize_pool.Stop();
  metrics_server.Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Both may re-execute the program (once, with the environment they set): the OpenMP
  // wait setting and the OpenBLAS kernels are read when the libraries load.
  const bool reexec = superpose::omp_wait::SetDefault();
  superpose::engine::cpu::EnsureBlasCoreType(argv);
  if (reexec) superpose::omp_wait::ExecSelf(argv);
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "superpose_server");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "superpose-server: serves a Llama-family model over gRPC (superpose.v1.Superpose).\n"
      "Usage: superpose-server [--model=DIR] [--listen=HOST:PORT] [flags]");
  absl::ParseCommandLine(argc, argv);
  // Block the shutdown and reload signals before any thread starts; Run() waits for them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A TLS client that disconnects mid-response must not kill the server (OpenSSL writes
  // with write(), which raises SIGPIPE, not send(MSG_NOSIGNAL)).
  signal(SIGPIPE, SIG_IGN);
  return Run();
}
