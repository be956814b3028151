// The metrics HTTP(S) endpoint. It must keep answering scrapes and probes whatever
// other clients do, so every connection is bounded:
//  - TCP_DEFER_ACCEPT: a connection is accepted only once its first bytes (request or
//    TLS ClientHello) arrive (or after 30 s), so idle connections do not take a worker;
//    the listen backlog is SOMAXCONN (cpp-httplib's 5 would overflow into SYN cookies,
//    which bypass the deferral);
//  - one request per connection (no keep-alive: an idle keep-alive connection would hold
//    a worker until its timeout), which must start within 1 s; 2 s read / write
//    timeouts; 8 KiB requests;
//  - a fixed pool of 32 worker threads (a waiting connection costs a sleeping thread).
//  Measured with 40 connections that never send a byte: scrapes answered in ~20 ms,
//  also after the 30 s deferral, when the kernel hands the 40 over at once (with 8
//  workers and a 2 s wait that scrape took 7.5 s; with httplib's defaults, 19-30 s).
//  - the port is bound exclusively (SO_REUSEADDR, never SO_REUSEPORT, which
//    cpp-httplib sets by default): a second server on the same port fails to start
//    instead of sharing the scrapes.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <httplib.h>

#include "server/http_listener.h"
#include "server/metrics.h"
#include "server/tls.h"

namespace superpose::server {
namespace {

constexpr int kWorkers = 32;
constexpr time_t kTimeoutS = 2;
constexpr int kDeferAcceptS = 30;
constexpr size_t kMaxRequestBytes = 8192;

// `listen_fd`: set to the listening socket (to raise its backlog after the bind).
void Harden(httplib::Server& http, int* listen_fd) {
  http.new_task_queue = [] { return new httplib::ThreadPool(kWorkers); };
  http.set_socket_options([listen_fd](socket_t sock) {
    *listen_fd = sock;
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    int defer = kDeferAcceptS;
    setsockopt(sock, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof(defer));
  });
  http.set_read_timeout(kTimeoutS, 0);
  http.set_write_timeout(kTimeoutS, 0);
  http.set_keep_alive_timeout(1);  // wait for the first request at most 1 s
  http.set_keep_alive_max_count(1);
  http.set_payload_max_length(kMaxRequestBytes);
}

}  // namespace

MetricsServer::MetricsServer(const Metrics* metrics) : metrics_(metrics) {}

MetricsServer::~MetricsServer() { Stop(); }

int MetricsServer::Start(const std::string& listen) {
  std::string host;
  int port = 0;
  if (!SplitListen(listen, &host, &port)) return -1;
  http_ = NewHttpServer(tls_);
  if (http_ == nullptr) return -1;
  int listen_fd = -1;
  Harden(*http_, &listen_fd);
  http_->Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
    // With mutual TLS the handshake verified any certificate presented; /metrics
    // needs one.
    if (tls_ != nullptr && tls_->mutual() &&
        (req.ssl == nullptr || SSL_get0_peer_certificate(req.ssl) == nullptr)) {
      res.status = 403;
      res.set_content("a client certificate is required\n", "text/plain");
      return;
    }
    if (authorize_ && !authorize_(req.get_header_value("Authorization"))) {
      res.status = 401;
      res.set_header("WWW-Authenticate", "Bearer");
      res.set_content("'Authorization: Bearer <key>' required\n", "text/plain");
      return;
    }
    res.set_content(metrics_->Render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    const absl::Status h = health_ ? health_() : absl::OkStatus();
    if (h.ok()) {
      res.set_content("ok\n", "text/plain");
    } else {
      res.status = 503;
      res.set_content(std::string(h.message()) + "\n", "text/plain");
    }
  });
  return BindAndServe(*http_, host, port, &thread_, [&listen_fd] {
    if (listen_fd >= 0) ::listen(listen_fd, SOMAXCONN);
  });
}

void MetricsServer::Stop() { StopServing(http_.get(), &thread_); }

}  // namespace superpose::server
