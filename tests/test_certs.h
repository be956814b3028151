// Throwaway certificates for TLS tests, made at test time with the OpenSSL C API (EC
// P-256, valid one day): a CA, server certificates for 127.0.0.1 / localhost, and
// client certificates whose subject common name is a tenant. Nothing is committed.
#pragma once

#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <string>

namespace superpose::testing {

struct Pem {
  std::string cert;
  std::string key;
};

namespace certs_internal {

inline std::string BioString(BIO* bio) {
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio, &data);
  std::string s(data, n > 0 ? n : 0);
  BIO_free(bio);
  return s;
}

inline void AddExt(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
}

inline X509* ReadCert(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  return x;
}

inline EVP_PKEY* ReadKey(const std::string& pem) {
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  EVP_PKEY* k = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  return k;
}

}  // namespace certs_internal

// A certificate for `cn`, signed by `ca` (self-signed CA when `ca` is null). `server`:
// subjectAltName 127.0.0.1 and localhost.
inline Pem MakeCert(const std::string& cn, const Pem* ca, bool server = false) {
  using namespace certs_internal;  // NOLINT
  static long serial = 1000;
  EVP_PKEY* key = EVP_EC_gen("P-256");
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), ++serial);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
  X509_set_pubkey(cert, key);
  X509_NAME* name = X509_get_subject_name(cert);
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509* issuer = ca != nullptr ? ReadCert(ca->cert) : cert;
  EVP_PKEY* issuer_key = ca != nullptr ? ReadKey(ca->key) : key;
  X509_set_issuer_name(cert, X509_get_subject_name(issuer));
  if (ca == nullptr) {
    AddExt(cert, issuer, NID_basic_constraints, "critical,CA:TRUE");
    AddExt(cert, issuer, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    AddExt(cert, issuer, NID_basic_constraints, "critical,CA:FALSE");
    AddExt(cert, issuer, NID_ext_key_usage, server ? "serverAuth" : "clientAuth");
    if (server) AddExt(cert, issuer, NID_subject_alt_name, "IP:127.0.0.1,DNS:localhost");
  }
  X509_sign(cert, issuer_key, EVP_sha256());
  Pem pem;
  BIO* b = BIO_new(BIO_s_mem());
  PEM_write_bio_X509(b, cert);
  pem.cert = BioString(b);
  b = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(b, key, nullptr, nullptr, 0, nullptr, nullptr);
  pem.key = BioString(b);
  if (ca != nullptr) {
    X509_free(issuer);
    EVP_PKEY_free(issuer_key);
  }
  X509_free(cert);
  EVP_PKEY_free(key);
  return pem;
}

inline void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream(path + ".tmp", std::ios::binary) << data;
  std::rename((path + ".tmp").c_str(), path.c_str());
}

// The subject CN of the certificate a TLS server on 127.0.0.1:`port` presents (ALPN h2,
// as gRPC expects; a fresh connection), with an optional client certificate; "" when
// the handshake fails.
inline std::string PeerCommonName(int port, const Pem& ca, const Pem* client = nullptr) {
  using namespace certs_internal;  // NOLINT
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  X509* ca_cert = ReadCert(ca.cert);
  X509_STORE_add_cert(SSL_CTX_get_cert_store(ctx), ca_cert);
  X509_free(ca_cert);
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  if (client != nullptr) {
    X509* c = ReadCert(client->cert);
    EVP_PKEY* k = ReadKey(client->key);
    SSL_CTX_use_certificate(ctx, c);
    SSL_CTX_use_PrivateKey(ctx, k);
    X509_free(c);
    EVP_PKEY_free(k);
  }
  static const unsigned char kAlpn[] = {2, 'h', '2'};
  SSL_CTX_set_alpn_protos(ctx, kAlpn, sizeof(kAlpn));
  std::string cn;
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  SSL* ssl = SSL_new(ctx);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      SSL_set_fd(ssl, fd) == 1 && SSL_connect(ssl) == 1) {
    if (X509* peer = SSL_get0_peer_certificate(ssl); peer != nullptr) {
      char buf[256] = {0};
      X509_NAME_get_text_by_NID(X509_get_subject_name(peer), NID_commonName, buf, sizeof(buf));
      cn = buf;
    }
  }
  SSL_free(ssl);
  close(fd);
  SSL_CTX_free(ctx);
  return cn;
}

}  // namespace superpose::testing
