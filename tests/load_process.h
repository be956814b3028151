// Helpers of the load-generator tests: run superpose-load as a child process and read
// its --json, sum labelled counters of a server's /metrics, and run nginx (Debian's
// package) on loopback in front of replicas with deploy/nginx/superpose.conf.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "tests/server_process.h"  // Spawn

namespace superpose::testing {

// The sum of every sample of `name` (all label sets) in a server's /metrics, or -1.
inline double MetricSum(int metrics_port, const std::string& name) {
  httplib::Client cli("127.0.0.1", metrics_port);
  auto res = cli.Get("/metrics");
  if (!res || res->status != 200) return -1;
  std::istringstream in(res->body);
  double sum = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(name, 0) != 0) continue;
    const char next = line[name.size()];
    if (next != ' ' && next != '{') continue;
    sum += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return sum;
}

// Requests, prompt and generated tokens a server counted so far.
struct ServerCounts {
  double requests = 0, prompt_tokens = 0, generated_tokens = 0;
};
inline ServerCounts Scrape(int metrics_port) {
  return {MetricSum(metrics_port, "superpose_requests_finished_total"),
          MetricSum(metrics_port, "superpose_prompt_tokens_total"),
          MetricSum(metrics_port, "superpose_generated_tokens_total")};
}

inline int WaitChild(pid_t pid) {
  int status = 0;
  if (pid <= 0 || waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A scratch directory removed at destruction.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/superpose-test-XXXXXX";
    path_ = mkdtemp(tmpl) != nullptr ? tmpl : "";
  }
  ~TempDir() {
    if (!path_.empty()) std::system(("rm -rf '" + path_ + "'").c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// superpose-load started with `args` (plus --json and --progress=false) against `server`.
class LoadProcess {
 public:
  LoadProcess(const std::string& server, std::vector<std::string> args, const std::string& dir) {
    static int counter = 0;
    const std::string base = dir + "/load-" + std::to_string(counter++);
    json_path_ = base + ".json";
    log_path_ = base + ".log";
    std::vector<std::string> argv = {std::string(SP_BINARY_DIR) + "/superpose-load",
                                     "--server=" + server, "--json=" + json_path_,
                                     "--progress=false"};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = Spawn(argv, log_path_);
  }
  ~LoadProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      WaitChild(pid_);
    }
  }
  // Waits for the exit; the exit status (-1: did not start or was killed).
  int Wait() {
    const int rc = WaitChild(pid_);
    pid_ = -1;
    return rc;
  }
  nlohmann::json Json() const {
    return nlohmann::json::parse(ReadFile(json_path_), nullptr, /*allow_exceptions=*/false);
  }
  std::string Log() const { return ReadFile(log_path_); }

 private:
  pid_t pid_ = -1;
  std::string json_path_, log_path_;
};

// A free TCP port on 127.0.0.1 (bound and released: racy only against other binders).
inline int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = -1;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  close(fd);
  return port;
}

inline bool Accepts(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// The nginx binary: $SUPERPOSE_NGINX, else Debian's /usr/sbin/nginx.
inline std::string NginxBinary() {
  const char* env = std::getenv("SUPERPOSE_NGINX");
  return env != nullptr && *env != '\0' ? env : "/usr/sbin/nginx";
}

// nginx in the foreground (daemon off) as the current user, with its prefix, pid, logs
// and temp files in a scratch directory, serving deploy/nginx/superpose.conf on a free
// loopback port in front of `replicas` ("127.0.0.1:PORT" each).
class NginxProcess {
 public:
  explicit NginxProcess(const std::vector<std::string>& replicas) {
    const std::string& d = dir_.path();
    std::string conf = ReadFile(std::string(SP_SOURCE_DIR) + "/deploy/nginx/superpose.conf");
    port_ = FreePort();
    const size_t at = conf.find("listen 8080");
    if (conf.empty() || at == std::string::npos || port_ <= 0) return;
    conf.replace(at, 11, "listen 127.0.0.1:" + std::to_string(port_));
    std::ofstream(d + "/superpose.conf") << conf;
    std::ofstream upstreams(d + "/superpose-replicas.conf");
    for (const auto& r : replicas)
      upstreams << "server " << r << " max_fails=1 fail_timeout=10s;\n";
    upstreams.close();
    std::ofstream(d + "/nginx.conf") << MainConfig(d);
    pid_ = Spawn({NginxBinary(), "-p", d, "-c", d + "/nginx.conf", "-e", d + "/error.log"},
                 d + "/stderr.log");
    for (int i = 0; i < 200 && pid_ > 0 && !Accepts(port_); ++i) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) pid_ = -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (pid_ > 0 && !Accepts(port_)) Stop();
  }
  ~NginxProcess() { Stop(); }
  bool ok() const { return pid_ > 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Why it did not start: its stderr and error log.
  std::string Log() const {
    return ReadFile(dir_.path() + "/stderr.log") + ReadFile(dir_.path() + "/error.log");
  }
  void Stop() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    WaitChild(pid_);
    pid_ = -1;
  }

 private:
  static std::string MainConfig(const std::string& d) {
    std::string user;
    if (geteuid() == 0) {  // as root nginx would switch its worker to `nobody`
      const passwd* pw = getpwuid(geteuid());
      user = "user " + std::string(pw != nullptr ? pw->pw_name : "root") + ";\n";
    }
    return user + "daemon off;\nworker_processes 1;\npid " + d + "/nginx.pid;\nerror_log " + d +
           "/error.log warn;\nevents { worker_connections 1024; }\nhttp {\n  access_log " + d +
           "/access.log;\n  client_body_temp_path " + d + "/client_body;\n  proxy_temp_path " + d +
           "/proxy;\n  fastcgi_temp_path " + d + "/fastcgi;\n  uwsgi_temp_path " + d +
           "/uwsgi;\n  scgi_temp_path " + d + "/scgi;\n  include superpose.conf;\n}\n";
  }

  TempDir dir_;
  pid_t pid_ = -1;
  int port_ = -1;
};

}  // namespace superpose::testing
