// The LoRA adapters a server serves (docs/operations.md "LoRA adapters"): added at
// start-up (--adapters) or through the admin rpcs, by name, each read from a PEFT
// directory (engine/lora_adapter.h). At most `max_resident` are loaded into the backend
// at once; the rest stay known by name and path and are reloaded from their path when a
// request names them. A request holds its adapter (a pin, AdapterRef) from Submit until
// it finishes, so an adapter in use is never evicted; the least recently used adapter
// that no request holds is evicted first. Thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend.h"
#include "engine/lora_adapter.h"
#include "engine/sequence/request.h"  // ValidateAdapterName

namespace superpose::engine {

struct AdapterInfo {
  std::string name;
  std::string path;
  std::string base_model;
  int64_t id = 0;
  int32_t rank = 0;
  float alpha = 0.0f;
  std::vector<std::string> modules;
  bool resident = false;  // loaded in the backend now
  int32_t requests = 0;   // requests holding it
  int64_t bytes = 0;      // float32 bytes of A and B (all ranks together)
};

struct AdapterCounters {
  int64_t loads = 0;      // loads into the backend (additions and reloads)
  int64_t evictions = 0;  // unloaded to make room
  int32_t resident = 0;
  int64_t resident_bytes = 0;
};

class AdapterManager {
 public:
  // Must outlive every request that holds an adapter (the engine's requests).
  AdapterManager(Backend* backend, const ModelConfig& config, int32_t max_resident);
  ~AdapterManager();  // unloads the resident adapters from the backend
  AdapterManager(const AdapterManager&) = delete;
  AdapterManager& operator=(const AdapterManager&) = delete;

  // Reads and checks the adapter in `path` and adds it as `name` (loaded now when a slot
  // is free or can be freed by eviction). INVALID_ARGUMENT naming `name` or the file's
  // problem, ALREADY_EXISTS for a name in use, UNIMPLEMENTED when the backend has no
  // adapters.
  absl::Status Add(const std::string& name, const std::string& path);
  // Forgets `name` (NOT_FOUND when unknown): new requests cannot name it; its weights
  // leave the backend when the last request holding it finishes.
  absl::Status Remove(const std::string& name);
  // Pins `name` for a request, reloading it if it was evicted. INVALID_ARGUMENT naming
  // adapter_id when unknown, RESOURCE_EXHAUSTED when every resident adapter is held by
  // running requests and none can be evicted.
  absl::StatusOr<std::shared_ptr<const AdapterRef>> Acquire(const std::string& name);
  bool Has(const std::string& name) const;
  std::vector<AdapterInfo> List() const;  // by name
  AdapterCounters counters() const;
  int32_t max_resident() const { return max_resident_; }

 private:
  struct Entry {
    AdapterInfo info;
    bool removed = false;
    uint64_t last_use = 0;
  };
  void Release(int64_t id);
  // Frees a backend slot when all are taken, evicting the least recently used adapter no
  // request holds; false when none can go.
  bool MakeRoom() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status LoadIntoBackend(Entry& e, const LoraAdapter& adapter)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Unload(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Backend* backend_;
  ModelConfig config_;
  int32_t max_resident_;
  mutable absl::Mutex mu_;
  std::map<std::string, int64_t> by_name_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int64_t, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t clock_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t resident_ ABSL_GUARDED_BY(mu_) = 0;
  AdapterCounters counters_ ABSL_GUARDED_BY(mu_);
};

// --adapters: "name=DIR,name2=DIR2" (empty: none).
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseAdapterFlag(
    const std::string& value);

}  // namespace superpose::engine
