// Starts superpose-server as a child process on a free loopback port for integration
// tests, and stops it with SIGTERM.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <sstream>

extern char** environ;

namespace superpose::testing {

// The value of an unlabelled metric from a server's /metrics, or -1.
inline double MetricValue(int port, const std::string& name) {
  httplib::Client cli("127.0.0.1", port);
  auto res = cli.Get("/metrics");
  if (!res || res->status != 200) return -1;
  std::istringstream in(res->body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  }
  return -1;
}

// Sends `bytes` as the request message of superpose.v1.Superpose/`method` (raw bytes:
// also malformed ones), with `key` as the bearer key when not empty, and reads until
// the call ends; the status.
inline grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel,
                            const std::string& method, const std::string& bytes,
                            const std::string& key = "") {
  grpc::GenericStub generic(channel);
  grpc::ClientContext ctx;
  if (!key.empty()) ctx.AddMetadata("authorization", "Bearer " + key);
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  grpc::CompletionQueue cq;
  auto call = generic.PrepareCall(&ctx, "/superpose.v1.Superpose/" + method, &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  cq.Next(&tag, &ok);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, grpc::WriteOptions().set_last_message(), reinterpret_cast<void*>(2));
  cq.Next(&tag, &ok);
  grpc::ByteBuffer response;
  do {
    call->Read(&response, reinterpret_cast<void*>(3));
    cq.Next(&tag, &ok);
  } while (ok);
  grpc::Status st;
  call->Finish(&st, reinterpret_cast<void*>(4));
  cq.Next(&tag, &ok);
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return st;
}

// Starts `args` (args[0]: the binary) as a child; `log_file`: where its stdout and stderr
// go (empty: inherited). The pid, or -1.
inline pid_t Spawn(std::vector<std::string> args, const std::string& log_file = "") {
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (!log_file.empty()) {
    posix_spawn_file_actions_addopen(&actions, 1, log_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
  }
  pid_t pid = -1;
  if (posix_spawn(&pid, cargv[0], &actions, nullptr, cargv.data(), environ) != 0) pid = -1;
  posix_spawn_file_actions_destroy(&actions);
  return pid;
}

class ServerProcess {
 public:
  // `args`: extra flags for superpose-server. `log_file`: where its stdout and stderr
  // (the log) go; empty: inherited.
  explicit ServerProcess(std::vector<std::string> args, const std::string& log_file = "") {
    static int counter = 0;
    port_file_ =
        "/tmp/superpose-test-port-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    metrics_port_file_ = port_file_ + "-metrics";
    std::remove(port_file_.c_str());
    std::remove(metrics_port_file_.c_str());
    std::vector<std::string> argv = {
        std::string(SP_BINARY_DIR) + "/superpose-server", "--listen=127.0.0.1:0",
        "--port_file=" + port_file_, "--metrics_listen=127.0.0.1:0",
        "--metrics_port_file=" + metrics_port_file_, "--log_level=warn",
        // The tests expect the CPU reference backend, also on
        // GPU machines (--backend defaults to auto); a later
        // --backend in `args` wins.
        "--backend=cpu"};
    for (auto& a : args) argv.push_back(a);
    pid_ = Spawn(std::move(argv), log_file);
    for (int i = 0; i < 600 && pid_ > 0; ++i) {  // up to 60 s
      std::ifstream in(port_file_);
      if (in >> port_) {
        std::ifstream(metrics_port_file_) >> metrics_port_;
        break;
      }
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~ServerProcess() { Stop(); }

  bool ok() const { return pid_ > 0 && port_ > 0; }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::shared_ptr<grpc::Channel> Channel() const {
    return grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
  }
  // Sends `sig` (e.g. SIGHUP: reload certificates and keys) to the running server.
  void Signal(int sig) const {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Waits up to `timeout` for the process to exit: its exit status, or -1 when it did
  // not exit in time (it is killed then) or did not exit normally.
  int WaitExit(std::chrono::milliseconds timeout) {
    if (pid_ <= 0) return -1;
    const auto end = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    pid_t got = 0;
    while ((got = waitpid(pid_, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (got == 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
    }
    pid_ = -1;
    std::remove(port_file_.c_str());
    std::remove(metrics_port_file_.c_str());
    return got == 0 || !WIFEXITED(status) ? -1 : WEXITSTATUS(status);
  }
  // SIGTERM and wait; returns the exit status (or -1).
  int Stop() {
    if (pid_ <= 0) return -1;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    std::remove(port_file_.c_str());
    std::remove(metrics_port_file_.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::string port_file_;
  std::string metrics_port_file_;
};

// A test suite whose tests share one server, started with Derived::ServerArgs() before
// the first test and stopped (exit status 0 expected) after the last.
template <typename Derived>
class SharedServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new ServerProcess(Derived::ServerArgs());
    ASSERT_TRUE(server_->ok()) << "superpose-server did not start";
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Stop(), 0);
    delete server_;
    server_ = nullptr;
  }
  static inline ServerProcess* server_ = nullptr;
};

}  // namespace superpose::testing
