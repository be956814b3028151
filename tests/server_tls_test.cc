// TLS and mutual TLS on the gRPC and metrics ports, the tenant from the client
// certificate, certificate reloads (SIGHUP, file change) and startup errors. The
// certificates are made at test time (tests/test_certs.h).
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_certs.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using testing::MakeCert;
using testing::PeerCommonName;
using testing::Pem;
using testing::ServerProcess;
using testing::WriteFile;

// A directory of certificates for one test: a CA, a server certificate "server-one",
// and the paths the server reads.
class Certs {
 public:
  Certs() : dir_("/tmp/superpose-tls-" + std::to_string(getpid()) + "-" + std::to_string(n_++)) {
    mkdir(dir_.c_str(), 0700);
    ca = MakeCert("test-ca", nullptr);
    WriteFile(ca_path(), ca.cert);
    SetServer(MakeCert("server-one", &ca, true));
  }
  ~Certs() { std::filesystem::remove_all(dir_); }  // keys and logs of the test
  void SetServer(const Pem& server) {
    WriteFile(cert_path(), server.cert);
    WriteFile(key_path(), server.key);
  }
  std::string cert_path() const { return dir_ + "/server.pem"; }
  std::string key_path() const { return dir_ + "/server.key"; }
  std::string ca_path() const { return dir_ + "/ca.pem"; }
  std::vector<std::string> TlsFlags(bool mutual) const {
    std::vector<std::string> f = {"--tls_cert=" + cert_path(), "--tls_key=" + key_path()};
    if (mutual) f.push_back("--tls_client_ca=" + ca_path());
    return f;
  }
  std::string log(const std::string& name) const { return dir_ + "/" + name + ".log"; }

  Pem ca;

 private:
  static inline int n_ = 0;
  std::string dir_;
};

// An HTTPS client writing to a server that refused its certificate must see an error,
// not die of SIGPIPE (OpenSSL writes with write()).
const bool kIgnoreSigpipe = (signal(SIGPIPE, SIG_IGN), true);

std::shared_ptr<grpc::Channel> TlsChannel(const ServerProcess& s, const Pem& ca,
                                          const Pem* client = nullptr) {
  grpc::SslCredentialsOptions o;
  o.pem_root_certs = ca.cert;
  if (client != nullptr) {
    o.pem_private_key = client->key;
    o.pem_cert_chain = client->cert;
  }
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a fresh connection per channel
  return grpc::CreateCustomChannel(s.address(), grpc::SslCredentials(o), args);
}

grpc::Status Info(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = v1::Superpose::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  return stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
}

v1::GenerateResponse Generate(const std::shared_ptr<grpc::Channel>& channel,
                              const v1::GenerateRequest& req, grpc::Status* st,
                              std::string* text = nullptr) {
  auto stub = v1::Superpose::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse r, last;
  while (reader->Read(&r)) {
    if (text != nullptr) *text += r.text();
    last = r;
  }
  *st = reader->Finish();
  return last;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Polls (up to 10 s) until the server on `port` presents a certificate named `cn`.
bool WaitForCommonName(int port, const Pem& ca, const std::string& cn, const Pem* client) {
  for (int i = 0; i < 100; ++i) {
    if (PeerCommonName(port, ca, client) == cn) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

TEST(ServerTlsTest, GenerateOverTls) {
  Certs certs;
  ServerProcess server([&] {
    auto f = certs.TlsFlags(false);
    f.push_back("--model=" + testing::Stories260kDir());
    return f;
  }());
  ASSERT_TRUE(server.ok());
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_max_new_tokens(8);
  req.mutable_sampling()->set_temperature(0);
  grpc::Status st;
  std::string text;
  v1::GenerateResponse last = Generate(TlsChannel(server, certs.ca), req, &st, &text);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(last.usage().generated_tokens(), 8u);
  EXPECT_FALSE(text.empty());
  // A plaintext client does not get through.
  EXPECT_FALSE(Info(server.Channel()).ok());
  // The metrics port speaks HTTPS with the same certificate.
  EXPECT_EQ(PeerCommonName(server.metrics_port(), certs.ca), "server-one");
  httplib::SSLClient cli("127.0.0.1", server.metrics_port());
  cli.set_ca_cert_path(certs.ca_path().c_str());
  cli.enable_server_certificate_verification(true);
  auto res = cli.Get("/metrics");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  EXPECT_NE(res->body.find("superpose_generated_tokens_total 8"), std::string::npos);
}

TEST(ServerTlsTest, MutualTlsNeedsACertificateFromTheClientCa) {
  Certs certs;
  ServerProcess server(certs.TlsFlags(true));
  ASSERT_TRUE(server.ok());
  const Pem good = MakeCert("tenant-a", &certs.ca);
  const Pem other_ca = MakeCert("other-ca", nullptr);
  const Pem stranger = MakeCert("tenant-a", &other_ca);
  EXPECT_FALSE(Info(TlsChannel(server, certs.ca)).ok());             // no certificate
  EXPECT_FALSE(Info(TlsChannel(server, certs.ca, &stranger)).ok());  // another CA
  EXPECT_FALSE(Info(TlsChannel(server, certs.ca, &other_ca)).ok());  // a CA as a client
  grpc::Status st = Info(TlsChannel(server, certs.ca, &good));
  EXPECT_TRUE(st.ok()) << st.error_message();

  // Metrics: /metrics needs the certificate, /healthz (probes) does not.
  auto get = [&](const Pem* client, const std::string& path) {
    const std::string dir = "/tmp/superpose-tls-client-" + std::to_string(getpid());
    std::unique_ptr<httplib::SSLClient> cli;
    if (client != nullptr) {
      WriteFile(dir + ".pem", client->cert);
      WriteFile(dir + ".key", client->key);
      cli = std::make_unique<httplib::SSLClient>("127.0.0.1", server.metrics_port(), dir + ".pem",
                                                 dir + ".key");
    } else {
      cli = std::make_unique<httplib::SSLClient>("127.0.0.1", server.metrics_port());
    }
    cli->set_ca_cert_path(certs.ca_path().c_str());
    cli->enable_server_certificate_verification(true);
    auto res = cli->Get(path.c_str());
    std::remove((dir + ".pem").c_str());
    std::remove((dir + ".key").c_str());
    return res ? res->status : -1;
  };
  EXPECT_EQ(get(nullptr, "/metrics"), 403);
  EXPECT_EQ(get(nullptr, "/healthz"), 200);
  EXPECT_EQ(get(&good, "/metrics"), 200);
  EXPECT_EQ(get(&stranger, "/metrics"), -1);  // the handshake fails
}

TEST(ServerTlsTest, TenantFromClientCertificate) {
  Certs certs;
  auto flags = certs.TlsFlags(true);
  flags.push_back("--tenant_from_client_cert");
  ServerProcess server(flags);
  ASSERT_TRUE(server.ok());
  const Pem a1 = MakeCert("tenant-a", &certs.ca);
  const Pem a2 = MakeCert("tenant-a", &certs.ca);  // another certificate, same tenant
  const Pem b = MakeCert("tenant-b", &certs.ca);
  v1::GenerateRequest req;
  for (int i = 0; i < 40; ++i) req.mutable_token_ids()->add_ids(300 + i);
  req.mutable_sampling()->set_max_new_tokens(4);
  req.mutable_sampling()->set_temperature(0);
  grpc::Status st;
  auto first = Generate(TlsChannel(server, certs.ca, &a1), req, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(first.usage().cached_prompt_tokens(), 0u);
  auto same_tenant = Generate(TlsChannel(server, certs.ca, &a2), req, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(same_tenant.usage().cached_prompt_tokens(), 32u);  // two full blocks of 16
  auto other_tenant = Generate(TlsChannel(server, certs.ca, &b), req, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(other_tenant.usage().cached_prompt_tokens(), 0u);
}

TEST(ServerTlsTest, CertificateReloadOnSighup) {
  Certs certs;
  auto flags = certs.TlsFlags(true);
  flags.push_back("--tls_reload_interval_s=0");  // SIGHUP only
  flags.push_back("--log_level=info");
  ServerProcess server(flags, certs.log("sighup"));
  ASSERT_TRUE(server.ok());
  const Pem client = MakeCert("tenant-a", &certs.ca);
  ASSERT_EQ(PeerCommonName(server.port(), certs.ca, &client), "server-one");

  // A certificate that does not match the key on disk is refused; the old one stays.
  const Pem two = MakeCert("server-two", &certs.ca, true);
  WriteFile(certs.cert_path(), two.cert);
  server.Signal(SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  EXPECT_EQ(PeerCommonName(server.port(), certs.ca, &client), "server-one");
  EXPECT_EQ(PeerCommonName(server.metrics_port(), certs.ca, &client), "server-one");
  EXPECT_TRUE(Info(TlsChannel(server, certs.ca, &client)).ok());

  // The matching key: served on both ports after SIGHUP, the server never stopped.
  WriteFile(certs.key_path(), two.key);
  server.Signal(SIGHUP);
  EXPECT_TRUE(WaitForCommonName(server.port(), certs.ca, "server-two", &client));
  EXPECT_TRUE(WaitForCommonName(server.metrics_port(), certs.ca, "server-two", &client));
  grpc::Status st = Info(TlsChannel(server, certs.ca, &client));
  EXPECT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(server.Stop(), 0);
  const std::string log = ReadAll(certs.log("sighup"));
  EXPECT_NE(log.find("reload tls: failed"), std::string::npos) << log;
  EXPECT_NE(log.find("does not match"), std::string::npos) << log;
  EXPECT_NE(log.find("reload tls: ok subject=/CN=server-two"), std::string::npos) << log;
  EXPECT_EQ(log.find("PRIVATE KEY"), std::string::npos);
}

TEST(ServerTlsTest, CertificateReloadWhenTheFilesChange) {
  Certs certs;
  auto flags = certs.TlsFlags(false);
  flags.push_back("--tls_reload_interval_s=1");
  ServerProcess server(flags);
  ASSERT_TRUE(server.ok());
  ASSERT_EQ(PeerCommonName(server.port(), certs.ca), "server-one");
  certs.SetServer(MakeCert("server-two", &certs.ca, true));
  EXPECT_TRUE(WaitForCommonName(server.port(), certs.ca, "server-two", nullptr));
  EXPECT_TRUE(WaitForCommonName(server.metrics_port(), certs.ca, "server-two", nullptr));
}

// superpose-cli speaks TLS and mutual TLS (--tls_ca, --tls_cert, --tls_key): the Docker
// HEALTHCHECK's `superpose-cli health` works against a TLS server.
TEST(ServerTlsTest, CliOverMutualTls) {
  Certs certs;
  ServerProcess server(certs.TlsFlags(true));
  ASSERT_TRUE(server.ok());
  const std::string client = certs.log("client");
  const Pem pem = MakeCert("tenant-a", &certs.ca);
  WriteFile(client + ".pem", pem.cert);
  WriteFile(client + ".key", pem.key);
  const std::string cli = std::string(SP_BINARY_DIR) + "/superpose-cli health --timeout_s=10 " +
                          "--server=" + server.address() + " ";
  auto run = [](const std::string& cmd) {
    const int rc = std::system((cmd + " >/dev/null 2>&1").c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  const std::string tls = "--tls_ca=" + certs.ca_path() + " --tls_server_name=localhost ";
  EXPECT_EQ(run(cli + tls + "--tls_cert=" + client + ".pem --tls_key=" + client + ".key"), 0);
  EXPECT_NE(run(cli + tls), 0);  // no client certificate
  EXPECT_NE(run(cli), 0);        // plaintext
  std::remove((client + ".pem").c_str());
  std::remove((client + ".key").c_str());
}

TEST(ServerTlsTest, StartupErrorsNameTheFlag) {
  Certs certs;
  const Pem other = MakeCert("server-x", &certs.ca, true);
  const std::string other_key = certs.log("other") + ".key";
  WriteFile(other_key, other.key);
  const std::string missing = certs.log("missing") + ".pem";
  const std::string keys = certs.log("keys") + ".txt";
  WriteFile(keys, "k t\n");
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--tls_cert=" + certs.cert_path()}, "--tls_cert and --tls_key go together"},
      {{"--tls_key=" + certs.key_path()}, "--tls_cert and --tls_key go together"},
      {{"--tls_cert=" + missing, "--tls_key=" + certs.key_path()}, "--tls_cert: " + missing},
      {{"--tls_cert=" + certs.cert_path(), "--tls_key=" + other_key},
       "--tls_key: " + other_key + ": the private key does not match"},
      {{"--tls_cert=" + certs.cert_path(), "--tls_key=" + certs.cert_path()},
       "--tls_key: " + certs.cert_path() + ": no PEM private key"},
      {{"--tls_cert=" + certs.cert_path(), "--tls_key=" + certs.key_path(),
        "--tls_client_ca=" + certs.key_path()},
       "--tls_client_ca: " + certs.key_path() + ": no PEM certificate"},
      {{"--tls_client_ca=" + certs.ca_path()}, "--tls_client_ca needs --tls_cert"},
      {{"--tls_cert=" + certs.cert_path(), "--tls_key=" + certs.key_path(),
        "--tenant_from_client_cert"},
       "--tenant_from_client_cert needs --tls_client_ca"},
      {{"--auth_metrics"}, "--auth_metrics needs --api_keys_file"},
      {{"--auth_reflection"}, "--auth_reflection needs --api_keys_file"},
  };
  for (const Case& c : cases) {
    ServerProcess server(c.flags, certs.log("startup"));
    EXPECT_FALSE(server.ok()) << c.message;
    const std::string log = ReadAll(certs.log("startup"));
    EXPECT_NE(log.find(c.message), std::string::npos) << log;
  }
  for (const std::string& f : {other_key, keys, certs.log("startup")}) std::remove(f.c_str());
}

}  // namespace
}  // namespace superpose
