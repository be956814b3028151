// Reload hooks: what the server re-reads on SIGHUP (certificates, the API key file, ...).
// Features register a named hook at startup; Run() calls them all, in order, on each
// SIGHUP. A hook returns a short summary for the log ("3 keys, 2 tenants") or an error;
// a failing hook keeps its old state. Neither may carry secrets (key material).
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "spdlog/spdlog.h"

namespace superpose::server {

class ReloadHooks {
 public:
  using Hook = std::function<absl::StatusOr<std::string>()>;

  void Add(std::string name, Hook hook) { hooks_.emplace_back(std::move(name), std::move(hook)); }

  // Runs every hook and logs each outcome; returns how many failed.
  int RunAll() const {
    int failed = 0;
    for (const auto& [name, hook] : hooks_) {
      absl::StatusOr<std::string> r = hook();
      if (r.ok()) {
        spdlog::info("reload {}: ok {}", name, *r);
      } else {
        ++failed;
        spdlog::error("reload {}: failed, keeping the previous state: {}", name,
                      r.status().ToString());
      }
    }
    return failed;
  }

  bool empty() const { return hooks_.empty(); }

 private:
  std::vector<std::pair<std::string, Hook>> hooks_;
};

}  // namespace superpose::server
