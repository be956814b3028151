// API keys: calls without a valid key are UNAUTHENTICATED; a key's tenant scopes the
// prefix cache (another tenant never reuses its blocks).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include "grpc/health/v1/health.grpc.pb.h"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;

v1::GenerateResponse Last(v1::Superpose::Stub& stub, const std::string& key,
                          const v1::GenerateRequest& req, grpc::Status* st) {
  grpc::ClientContext ctx;
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse r, last;
  while (reader->Read(&r)) last = r;
  *st = reader->Finish();
  return last;
}

TEST(ServerAuthTest, KeysAndTenantScopedPrefixCache) {
  const std::string keys = "/tmp/superpose-test-keys-" + std::to_string(getpid());
  std::ofstream(keys) << "# key tenant\nkey-a tenant-a\nkey-b tenant-b\nkey-a2 tenant-a\n";
  testing::ServerProcess server(
      {"--model=" + testing::Stories260kDir(), "--api_keys_file=" + keys});
  ASSERT_TRUE(server.ok());
  auto stub = v1::Superpose::NewStub(server.Channel());

  v1::GenerateRequest req;
  for (int i = 0; i < 40; ++i) req.mutable_token_ids()->add_ids(300 + i);
  req.mutable_sampling()->set_max_new_tokens(4);
  req.mutable_sampling()->set_temperature(0);

  grpc::Status st;
  Last(*stub, "", req, &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  Last(*stub, "wrong", req, &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  {
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    EXPECT_EQ(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }

  auto first = Last(*stub, "key-a", req, &st);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(first.usage().cached_prompt_tokens(), 0u);
  auto same_tenant = Last(*stub, "key-a2", req, &st);  // another key of tenant-a
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(same_tenant.usage().cached_prompt_tokens(), 32u);  // two full blocks of 16
  auto other_tenant = Last(*stub, "key-b", req, &st);
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(other_tenant.usage().cached_prompt_tokens(), 0u);
  std::remove(keys.c_str());
}

// The command-line client sends its key from --api_key or $SUPERPOSE_API_KEY.
TEST(ServerAuthTest, CliSendsItsKey) {
  const std::string keys = "/tmp/superpose-test-clikeys-" + std::to_string(getpid());
  std::ofstream(keys) << "key-c tenant-c\n";
  testing::ServerProcess server({"--api_keys_file=" + keys});
  ASSERT_TRUE(server.ok());
  const std::string cli = std::string(SP_BINARY_DIR) +
                          "/superpose-cli --server=" + server.address() +
                          " --timeout_s=30 info >/dev/null 2>&1";
  auto run = [](const std::string& cmd) {
    const int rc = std::system(cmd.c_str());
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  };
  EXPECT_NE(run("env -u SUPERPOSE_API_KEY " + cli), 0);
  EXPECT_NE(run("env SUPERPOSE_API_KEY=wrong " + cli), 0);
  EXPECT_EQ(run("env SUPERPOSE_API_KEY=key-c " + cli), 0);
  EXPECT_EQ(run("env -u SUPERPOSE_API_KEY " + cli + " --api_key=key-c"), 0);
  std::remove(keys.c_str());
}

TEST(ServerAuthTest, BadKeysFileStopsStartup) {
  const std::string keys = "/tmp/superpose-test-badkeys-" + std::to_string(getpid());
  std::ofstream(keys) << "only-one-field\n";
  testing::ServerProcess server({"--api_keys_file=" + keys});
  EXPECT_FALSE(server.ok());
  std::remove(keys.c_str());
}

grpc::StatusCode InfoCode(v1::Superpose::Stub& stub, const std::string& key) {
  grpc::ClientContext ctx;
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  v1::ModelInfo info;
  return stub.GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).error_code();
}

// SIGHUP re-reads the key file: the old key is refused, the new one accepted; a bad
// file keeps the keys; the log names counts, never a key.
TEST(ServerAuthTest, KeyFileReloadOnSighup) {
  const std::string keys = "/tmp/superpose-test-reloadkeys-" + std::to_string(getpid());
  const std::string log = keys + ".log";
  std::ofstream(keys) << "old-secret-key tenant-a\n";
  testing::ServerProcess server({"--api_keys_file=" + keys, "--log_level=info"}, log);
  ASSERT_TRUE(server.ok());
  auto stub = v1::Superpose::NewStub(server.Channel());
  EXPECT_EQ(InfoCode(*stub, "old-secret-key"), grpc::StatusCode::OK);

  // Fields after the tenant (per-tenant settings) are ignored here.
  std::ofstream(keys) << "new-secret-key tenant-a max_running=4\n"
                         "other-secret-key tenant-b max_prompt_tokens=8\n";
  server.Signal(SIGHUP);
  for (int i = 0; i < 100 && InfoCode(*stub, "new-secret-key") != grpc::StatusCode::OK; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(InfoCode(*stub, "new-secret-key"), grpc::StatusCode::OK);
  EXPECT_EQ(InfoCode(*stub, "other-secret-key"), grpc::StatusCode::OK);
  EXPECT_EQ(InfoCode(*stub, "old-secret-key"), grpc::StatusCode::UNAUTHENTICATED);
  // The tenants' limits of the new file apply too.
  v1::GenerateRequest req;
  for (int i = 0; i < 12; ++i) req.mutable_token_ids()->add_ids(300 + i);
  req.mutable_sampling()->set_max_new_tokens(2);
  grpc::Status st;
  Last(*stub, "other-secret-key", req, &st);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << st.error_message();
  Last(*stub, "new-secret-key", req, &st);
  EXPECT_TRUE(st.ok()) << st.error_message();

  std::ofstream(keys) << "bad-secret-key-alone\n";  // a bad file: the keys stay
  server.Signal(SIGHUP);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  EXPECT_EQ(InfoCode(*stub, "new-secret-key"), grpc::StatusCode::OK);
  EXPECT_EQ(InfoCode(*stub, "bad-secret-key-alone"), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(server.Stop(), 0);

  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  EXPECT_NE(text.str().find("reload api_keys_file: ok 2 keys, 2 tenants"), std::string::npos)
      << text.str();
  EXPECT_NE(text.str().find("reload api_keys_file: failed"), std::string::npos) << text.str();
  EXPECT_EQ(text.str().find("secret-key"), std::string::npos) << text.str();
  std::remove(keys.c_str());
  std::remove(log.c_str());
}

// --auth_metrics: /metrics needs a key; /healthz stays open for probes.
TEST(ServerAuthTest, AuthMetrics) {
  const std::string keys = "/tmp/superpose-test-metricskeys-" + std::to_string(getpid());
  std::ofstream(keys) << "key-m tenant-m\n";
  testing::ServerProcess server({"--api_keys_file=" + keys, "--auth_metrics"});
  ASSERT_TRUE(server.ok());
  httplib::Client cli("127.0.0.1", server.metrics_port());
  auto status = [&](const std::string& path, const std::string& auth) {
    httplib::Headers h;
    if (!auth.empty()) h.emplace("Authorization", auth);
    auto res = cli.Get(path.c_str(), h);
    return res ? res->status : -1;
  };
  EXPECT_EQ(status("/metrics", ""), 401);
  EXPECT_EQ(status("/metrics", "Bearer wrong"), 401);
  EXPECT_EQ(status("/metrics", "key-m"), 401);
  EXPECT_EQ(status("/metrics", "Bearer key-m"), 200);
  EXPECT_EQ(status("/healthz", ""), 200);
  std::remove(keys.c_str());
}

// One ServerReflectionInfo exchange (list_services) with raw protobuf bytes: the
// response bytes and the final status.
grpc::Status ListServices(const std::shared_ptr<grpc::Channel>& channel, const std::string& key,
                          std::string* response) {
  grpc::ClientContext ctx;
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &ctx));
  grpc::Slice list_services(std::string("\x3a\x00", 2));  // field 7 (list_services): ""
  stream->Write(grpc::ByteBuffer(&list_services, 1));
  stream->WritesDone();
  grpc::ByteBuffer buf;
  while (stream->Read(&buf)) {
    std::vector<grpc::Slice> slices;
    (void)buf.Dump(&slices);
    for (const grpc::Slice& s : slices) response->append(s.begin(), s.end());
  }
  return stream->Finish();
}

// --auth_reflection: reflection needs a key (none of its answer leaks without one);
// health stays open.
TEST(ServerAuthTest, AuthReflection) {
  const std::string keys = "/tmp/superpose-test-reflkeys-" + std::to_string(getpid());
  std::ofstream(keys) << "key-r tenant-r\n";
  for (const bool guarded : {false, true}) {
    std::vector<std::string> flags = {"--api_keys_file=" + keys};
    if (guarded) flags.push_back("--auth_reflection");
    testing::ServerProcess server(flags);
    ASSERT_TRUE(server.ok());
    std::string response;
    grpc::Status st = ListServices(server.Channel(), "", &response);
    if (guarded) {
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
      EXPECT_EQ(response.find("superpose.v1.Superpose"), std::string::npos);
      EXPECT_NE(response.find("--auth_reflection"), std::string::npos);
      response.clear();
      st = ListServices(server.Channel(), "wrong", &response);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAUTHENTICATED);
      EXPECT_EQ(response.find("superpose.v1.Superpose"), std::string::npos);
      response.clear();
    } else {
      EXPECT_TRUE(st.ok()) << st.error_message();
      EXPECT_NE(response.find("superpose.v1.Superpose"), std::string::npos);
      response.clear();
    }
    st = ListServices(server.Channel(), "key-r", &response);
    EXPECT_TRUE(st.ok()) << st.error_message();
    EXPECT_NE(response.find("superpose.v1.Superpose"), std::string::npos);
    // Health needs no key.
    auto health = grpc::health::v1::Health::NewStub(server.Channel());
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest hreq;
    grpc::health::v1::HealthCheckResponse hres;
    EXPECT_TRUE(health->Check(&ctx, hreq, &hres).ok());
    EXPECT_EQ(hres.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  std::remove(keys.c_str());
}

}  // namespace
}  // namespace superpose
