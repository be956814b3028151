// API keys: calls without a valid key are UNAUTHENTICATED; a key's tenant scopes the
// prefix cache (another tenant never reuses its blocks).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>

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

}  // namespace
}  // namespace superpose
