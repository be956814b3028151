// What the two cpp-httplib servers (metrics, server/metrics_server.cc; the OpenAI API,
// server/openai_server.cc) share: parsing --*_listen, plain or TLS, binding (port 0: any
// free port), serving on a thread once running, and stopping.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include <httplib.h>

#include "absl/strings/numbers.h"
#include "server/tls.h"

namespace superpose::server {

// "host:port" (the last colon splits, so "[::1]:80" works); false when malformed.
inline bool SplitListen(const std::string& listen, std::string* host, int* port) {
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), port)) {
    return false;
  }
  *host = listen.substr(0, colon);
  return true;
}

// An HTTPS server on `tls`'s current certificate (re-read on reload), or plain HTTP when
// `tls` is null; null when it cannot be set up.
inline std::unique_ptr<httplib::Server> NewHttpServer(TlsCertStore* tls) {
  std::unique_ptr<httplib::Server> http;
  if (tls != nullptr) {
    http =
        std::make_unique<httplib::SSLServer>([tls](SSL_CTX& ctx) { return tls->SetupSslCtx(ctx); });
  } else {
    http = std::make_unique<httplib::Server>();
  }
  return http->is_valid() ? std::move(http) : nullptr;
}

// Binds `host`:`port` (0: any free port) and serves on `thread`; `after_bind` runs between
// the bind and the serving (e.g. to raise the backlog). Returns the port, or -1.
template <typename AfterBind>
int BindAndServe(httplib::Server& http, const std::string& host, int port, std::thread* thread,
                 AfterBind&& after_bind) {
  if (port == 0) {
    port = http.bind_to_any_port(host);
  } else if (!http.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) return -1;
  after_bind();
  *thread = std::thread([&http] { http.listen_after_bind(); });
  // Stop() is only reliable once the server runs: wait for it (bounded).
  for (int i = 0; i < 5000 && !http.is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return port;
}

inline void StopServing(httplib::Server* http, std::thread* thread) {
  if (thread->joinable()) {
    http->stop();
    thread->join();
  }
}

}  // namespace superpose::server
