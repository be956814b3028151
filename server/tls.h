// Transport security: the server certificate (--tls_cert, --tls_key) and the CA that
// client certificates must chain to (--tls_client_ca, mutual TLS), for the gRPC port
// and the metrics port. Reload() re-reads and checks the files (SIGHUP, or a file
// change seen by WatchFiles); a bad set of files is refused and the old one stays.
//
// gRPC 1.51 has no public API to swap a running server's certificate other than its
// FileWatcherCertificateProvider, which re-reads files on a timer and drops the
// identity (failing handshakes) while the files on disk are inconsistent, e.g. halfway
// through a rotation. So the provider watches in-memory files (memfd, never on disk)
// that hold only validated material: Reload() checks the operator's files first and
// then replaces the memfds atomically (dup3); gRPC takes them up within a second. The
// metrics port (OpenSSL via cpp-httplib) switches each new handshake to the current
// SSL_CTX.
#pragma once

#include <openssl/ssl.h>

#include <memory>
#include <string>
#include <thread>

#include <grpcpp/security/server_credentials.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

namespace superpose::server {

struct TlsFiles {
  std::string cert;       // PEM certificate chain, leaf first (--tls_cert)
  std::string key;        // PEM private key, unencrypted (--tls_key)
  std::string client_ca;  // PEM CA certificates for client certificates (--tls_client_ca)
};

class TlsCertStore {
 public:
  // Reads and checks the files; errors name the flag and the file, never key material.
  static absl::StatusOr<std::unique_ptr<TlsCertStore>> Create(const TlsFiles& files);
  ~TlsCertStore();
  TlsCertStore(const TlsCertStore&) = delete;
  TlsCertStore& operator=(const TlsCertStore&) = delete;

  bool mutual() const { return !files_.client_ca.empty(); }
  // Credentials for grpc::ServerBuilder::AddListeningPort; they follow Reload().
  std::shared_ptr<grpc::ServerCredentials> GrpcCredentials() const;
  // Sets up an httplib::SSLServer's SSL_CTX: TLS 1.2+, the current certificate, and (mutual
  // TLS) a client certificate that must verify when presented. Each handshake then
  // switches to the certificate of the latest Reload().
  bool SetupSslCtx(SSL_CTX& ctx);
  // Re-reads the files; returns a summary (subject, expiry) or the error (old files stay).
  absl::StatusOr<std::string> Reload();
  // Calls Reload() when the files' contents change, checked every `interval`; logs.
  void WatchFiles(absl::Duration interval);

 private:
  struct Material;
  explicit TlsCertStore(TlsFiles files) : files_(std::move(files)) {}
  absl::StatusOr<Material> Read() const;
  absl::Status Publish(const Material& m);
  size_t FilesFingerprint() const;
  static int OnClientHello(SSL* ssl, int* alert, void* arg);

  TlsFiles files_;
  int identity_fd_ = -1;  // memfd: key + certificate chain (PEM), for gRPC
  int root_fd_ = -1;      // memfd: client CA certificates (PEM), for gRPC
  mutable absl::Mutex mu_;
  SSL_CTX* current_ctx_ ABSL_GUARDED_BY(mu_) = nullptr;  // for the metrics port
  absl::Notification stop_;
  std::thread watcher_;
};

}  // namespace superpose::server
