#include "server/tls.h"

#include <fcntl.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>
#include <vector>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "absl/strings/str_cat.h"
#include "spdlog/spdlog.h"

namespace superpose::server {
namespace {

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;

absl::StatusOr<std::string> ReadFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": ", path, ": cannot read (", std::strerror(errno), ")"));
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::vector<X509Ptr> ParseCerts(const std::string& pem) {
  std::vector<X509Ptr> certs;
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) certs.emplace_back(x);
  ERR_clear_error();
  return certs;
}

// An encrypted key is refused (no passphrase prompt on a server).
int NoPassphrase(char*, int, int, void*) { return 0; }

PkeyPtr ParseKey(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  return key;
}

std::string BioString(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  return std::string(data, n > 0 ? n : 0);
}

std::string CertsPem(const std::vector<X509Ptr>& certs) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  for (const X509Ptr& c : certs) PEM_write_bio_X509(bio.get(), c.get());
  return BioString(bio.get());
}

std::string KeyPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr);
  return BioString(bio.get());
}

// "subject=/CN=... not_after=..." of a certificate (public information).
std::string Describe(X509* cert) {
  char subject[256];
  X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof(subject));
  BioPtr bio(BIO_new(BIO_s_mem()));
  ASN1_TIME_print(bio.get(), X509_get0_notAfter(cert));
  return absl::StrCat("subject=", subject, " not_after=", BioString(bio.get()));
}

// A memfd holding `data`; replaces *fd atomically when it is already open.
absl::Status WriteMemfd(const char* name, const std::string& data, int* fd) {
  const int fresh = memfd_create(name, MFD_CLOEXEC);
  if (fresh < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
  if (write(fresh, data.data(), data.size()) != static_cast<ssize_t>(data.size())) {
    close(fresh);
    return absl::InternalError("cannot write the in-memory certificate file");
  }
  if (*fd < 0) {
    *fd = fresh;
    return absl::OkStatus();
  }
  const int rc = dup3(fresh, *fd, O_CLOEXEC);
  close(fresh);
  if (rc < 0) return absl::InternalError(absl::StrCat("dup3: ", std::strerror(errno)));
  return absl::OkStatus();
}

std::string FdPath(int fd) { return absl::StrCat("/proc/self/fd/", fd); }

}  // namespace

struct TlsCertStore::Material {
  std::vector<X509Ptr> chain;  // leaf first
  PkeyPtr key;
  std::vector<X509Ptr> client_cas;
};

absl::StatusOr<TlsCertStore::Material> TlsCertStore::Read() const {
  Material m;
  absl::StatusOr<std::string> cert = ReadFile("--tls_cert", files_.cert);
  if (!cert.ok()) return cert.status();
  m.chain = ParseCerts(*cert);
  if (m.chain.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_cert: ", files_.cert, ": no PEM certificate"));
  }
  absl::StatusOr<std::string> key = ReadFile("--tls_key", files_.key);
  if (!key.ok()) return key.status();
  m.key = ParseKey(*key);
  if (m.key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_key: ", files_.key, ": no PEM private key (encrypted keys are not supported)"));
  }
  if (X509_check_private_key(m.chain[0].get(), m.key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls_key: ", files_.key,
                                                   ": the private key does not match the "
                                                   "certificate of --tls_cert (",
                                                   files_.cert, ")"));
  }
  if (mutual()) {
    absl::StatusOr<std::string> ca = ReadFile("--tls_client_ca", files_.client_ca);
    if (!ca.ok()) return ca.status();
    m.client_cas = ParseCerts(*ca);
    if (m.client_cas.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tls_client_ca: ", files_.client_ca, ": no PEM certificate"));
    }
  }
  return m;
}

namespace {

// TLS 1.2+, no session resumption (a resumed session would skip the client
// certificate check against a reloaded CA), the identity, and the client CAs.
bool ConfigureCtx(SSL_CTX* ctx, const std::vector<X509Ptr>& chain, EVP_PKEY* key,
                  const std::vector<X509Ptr>& client_cas) {
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  if (SSL_CTX_use_certificate(ctx, chain[0].get()) != 1) return false;
  for (size_t i = 1; i < chain.size(); ++i) {
    if (SSL_CTX_add1_chain_cert(ctx, chain[i].get()) != 1) return false;
  }
  if (SSL_CTX_use_PrivateKey(ctx, key) != 1) return false;
  if (client_cas.empty()) return true;
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  for (const X509Ptr& ca : client_cas) {
    if (X509_STORE_add_cert(store, ca.get()) != 1 || SSL_CTX_add_client_CA(ctx, ca.get()) != 1) {
      return false;
    }
  }
  // A certificate, when presented, must verify; the metrics handler requires one for
  // /metrics and leaves /healthz to probes that have none.
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  return true;
}

}  // namespace

absl::Status TlsCertStore::Publish(const Material& m) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == nullptr || !ConfigureCtx(ctx, m.chain, m.key.get(), m.client_cas)) {
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return absl::InternalError("cannot set up the OpenSSL context");
  }
  absl::Status st =
      WriteMemfd("superpose-tls-identity", KeyPem(m.key.get()) + CertsPem(m.chain), &identity_fd_);
  if (st.ok() && mutual()) st = WriteMemfd("superpose-tls-ca", CertsPem(m.client_cas), &root_fd_);
  if (!st.ok()) {
    SSL_CTX_free(ctx);
    return st;
  }
  absl::MutexLock lock(&mu_);
  std::swap(current_ctx_, ctx);
  SSL_CTX_free(ctx);  // handshakes still using the old context hold their own reference
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TlsCertStore>> TlsCertStore::Create(const TlsFiles& files) {
  std::unique_ptr<TlsCertStore> store(new TlsCertStore(files));
  absl::StatusOr<Material> m = store->Read();
  if (!m.ok()) return m.status();
  if (absl::Status st = store->Publish(*m); !st.ok()) return st;
  return store;
}

TlsCertStore::~TlsCertStore() {
  stop_.Notify();
  if (watcher_.joinable()) watcher_.join();
  absl::MutexLock lock(&mu_);
  SSL_CTX_free(current_ctx_);
  if (identity_fd_ >= 0) close(identity_fd_);
  if (root_fd_ >= 0) close(root_fd_);
}

absl::StatusOr<std::string> TlsCertStore::Reload() {
  static absl::Mutex reload_mu(absl::kConstInit);  // SIGHUP and the file watcher
  absl::MutexLock lock(&reload_mu);
  absl::StatusOr<Material> m = Read();
  if (!m.ok()) return m.status();
  if (absl::Status st = Publish(*m); !st.ok()) return st;
  return Describe(m->chain[0].get());
}

std::shared_ptr<grpc::ServerCredentials> TlsCertStore::GrpcCredentials() const {
  // The provider re-reads the memfds every second (gRPC's minimum).
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      FdPath(identity_fd_), FdPath(identity_fd_), mutual() ? FdPath(root_fd_) : std::string(), 1);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (mutual()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

int TlsCertStore::OnClientHello(SSL* ssl, int* alert, void* arg) {
  auto* self = static_cast<TlsCertStore*>(arg);
  absl::MutexLock lock(&self->mu_);
  if (SSL_get_SSL_CTX(ssl) != self->current_ctx_) SSL_set_SSL_CTX(ssl, self->current_ctx_);
  return SSL_CLIENT_HELLO_SUCCESS;
}

bool TlsCertStore::SetupSslCtx(SSL_CTX& ctx) {
  absl::StatusOr<Material> m = Read();
  if (!m.ok()) return false;
  if (!ConfigureCtx(&ctx, m->chain, m->key.get(), m->client_cas)) return false;
  SSL_CTX_set_client_hello_cb(&ctx, &TlsCertStore::OnClientHello, this);
  return true;
}

size_t TlsCertStore::FilesFingerprint() const {
  std::string all;
  for (const std::string* path : {&files_.cert, &files_.key, &files_.client_ca}) {
    if (path->empty()) continue;
    std::ifstream in(*path, std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    absl::StrAppend(&all, s.str(), "\n--\n");
  }
  return std::hash<std::string>()(all);
}

void TlsCertStore::WatchFiles(absl::Duration interval) {
  if (interval <= absl::ZeroDuration() || watcher_.joinable()) return;
  watcher_ = std::thread([this, interval] {
    size_t seen = FilesFingerprint();
    while (!stop_.WaitForNotificationWithTimeout(interval)) {
      const size_t now = FilesFingerprint();
      if (now == seen) continue;
      seen = now;
      absl::StatusOr<std::string> r = Reload();
      if (r.ok()) {
        spdlog::info("reload tls (files changed): ok {}", *r);
      } else {
        spdlog::error("reload tls (files changed): failed, keeping the previous certificate: {}",
                      r.status().ToString());
      }
    }
  });
}

}  // namespace superpose::server
