// The OpenAI-compatible HTTP API (docs/api.md "HTTP API"): GET /v1/models,
// POST /v1/completions, POST /v1/chat/completions (also streamed as server-sent
// events), on its own port (--http_listen). Requests go through the same bounds,
// tenants (bearer keys), tokenize pool, engine, metrics and shutdown gate as gRPC.
//
// Its own port, not the metrics server's: that one is hardened for scrapes (one request
// per connection, 2 s timeouts, 8 KiB requests, a small fixed pool), which an API
// needs the opposite of (keep-alive, request bodies up to --max_request_bytes, responses
// streamed for minutes); on one port, API load would also starve the probes.
#pragma once

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "server/auth.h"
#include "server/call_gate.h"
#include "server/chat_prompt.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/openai_protocol.h"
#include "server/work_pool.h"

namespace superpose::engine {
class AdapterManager;  // engine/runtime/adapters.h
}  // namespace superpose::engine

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace superpose::server {

class TlsCertStore;

struct OpenAiServerOptions {
  int threads = 64;               // connections served at once (a stream holds one)
  int64_t max_request_bytes = 0;  // request bodies (--max_request_bytes)
  int keep_alive_s = 5;           // an idle connection is closed after this
  int io_timeout_s = 30;          // reading a request / writing a response
};

class OpenAiServer {
 public:
  // `gate`: the gRPC service's (SuperposeService::gate()), so that shutdown refuses and
  // waits for HTTP calls too. `pool`: where long prompts tokenize (may be null).
  OpenAiServer(const engine::ModelBundle* model, engine::Engine* engine, Limits limits,
               const ChatPrompter* chat, Metrics* metrics, const Authenticator* auth,
               WorkPool* pool, CallGate* gate, OpenAiServerOptions options);
  ~OpenAiServer();
  // HTTPS with this certificate (before Start).
  void set_tls(TlsCertStore* tls) { tls_ = tls; }
  // LoRA adapters `model` may name, listed by /v1/models (before Start; null: none).
  void set_adapters(const engine::AdapterManager* adapters) { adapters_ = adapters; }
  // Listens on host:port (port 0 picks one): the bound port, or -1.
  int Start(const std::string& listen);
  // Closes the port and every connection (streams still running are cancelled).
  void Stop();

 private:
  class Call;
  void Route();
  void Generate(const httplib::Request& req, httplib::Response& res, int endpoint);
  void Models(const httplib::Request& req, httplib::Response& res);
  // Builds the engine requests (tokenizing on the pool when long).
  absl::StatusOr<std::vector<engine::Request>> Tokenize(const openai::CallPlan& plan,
                                                        const std::string& tenant,
                                                        int64_t text_bytes);

  const engine::ModelBundle* model_;
  engine::Engine* engine_;
  Limits limits_;
  const ChatPrompter* chat_;
  Metrics* metrics_;
  const Authenticator* auth_;
  const engine::AdapterManager* adapters_ = nullptr;
  WorkPool* pool_;
  CallGate* gate_;
  OpenAiServerOptions options_;
  TlsCertStore* tls_ = nullptr;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
};

}  // namespace superpose::server
