// The metrics endpoint cannot be starved by idle connections, and both ports are bound
// exclusively: a second server on a taken gRPC or metrics port fails to start.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;

int Connect(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// 40 connections that never send a byte, and 40 that sent a request and stay open
// (keep-alive): a scrape still answers within a 3 s client timeout. (With cpp-httplib's
// defaults, 8 workers each held by an idle connection for 5 s, it took about 25 s.)
TEST(ServerPortsTest, MetricsAnswersDespiteIdleConnections) {
  testing::ServerProcess server({});
  ASSERT_TRUE(server.ok());
  std::vector<int> fds;
  for (int i = 0; i < 40; ++i) fds.push_back(Connect(server.metrics_port()));
  for (int i = 0; i < 40; ++i) {
    const int fd = Connect(server.metrics_port());
    const std::string req = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n";
    EXPECT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
    fds.push_back(fd);
  }
  for (int fd : fds) ASSERT_GE(fd, 0);
  for (int round = 0; round < 3; ++round) {
    httplib::Client cli("127.0.0.1", server.metrics_port());
    cli.set_connection_timeout(3, 0);
    cli.set_read_timeout(3, 0);
    auto res = cli.Get("/metrics");
    ASSERT_TRUE(res) << "scrape " << round << ": " << httplib::to_string(res.error());
    EXPECT_EQ(res->status, 200);
    EXPECT_NE(res->body.find("superpose_kv_blocks_total"), std::string::npos);
  }
  for (int fd : fds) close(fd);
}

TEST(ServerPortsTest, SecondServerOnATakenPortFails) {
  testing::ServerProcess first({});
  ASSERT_TRUE(first.ok());
  const std::string log = "/tmp/superpose-test-ports-" + std::to_string(getpid()) + ".log";
  {
    testing::ServerProcess second({"--listen=127.0.0.1:" + std::to_string(first.port())}, log);
    EXPECT_FALSE(second.ok());
    EXPECT_NE(
        ReadAll(log).find("--listen: cannot listen on 127.0.0.1:" + std::to_string(first.port())),
        std::string::npos)
        << ReadAll(log);
  }
  {
    testing::ServerProcess second(
        {"--metrics_listen=127.0.0.1:" + std::to_string(first.metrics_port())}, log);
    EXPECT_FALSE(second.ok());
    EXPECT_NE(ReadAll(log).find("--metrics_listen: cannot listen on 127.0.0.1:" +
                                std::to_string(first.metrics_port())),
              std::string::npos)
        << ReadAll(log);
  }
  // The first server still has both ports to itself.
  for (int i = 0; i < 4; ++i)
    EXPECT_GE(testing::MetricValue(first.metrics_port(), "superpose_kv_blocks_total"), 1);
  auto stub = v1::Superpose::NewStub(first.Channel());
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  EXPECT_TRUE(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  std::remove(log.c_str());
}

}  // namespace
}  // namespace superpose
