#include "engine/runtime/adapters.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/util/status.h"
#include "spdlog/spdlog.h"

namespace superpose::engine {

AdapterManager::AdapterManager(Backend* backend, const ModelConfig& config, int32_t max_resident)
    : backend_(backend), config_(config), max_resident_(std::max(1, max_resident)) {}

AdapterManager::~AdapterManager() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, e] : entries_) Unload(e);
}

absl::Status AdapterManager::Add(const std::string& name, const std::string& path) {
  SP_RETURN_IF_ERROR(ValidateAdapterName(name, "name"));
  if (!backend_->SupportsAdapters()) {
    return absl::UnimplementedError(
        absl::StrCat("the ", backend_->name(), " backend does not serve LoRA adapters"));
  }
  // Read and checked before taking the lock: requests keep being admitted meanwhile.
  absl::StatusOr<LoraAdapter> adapter = LoadPeftAdapter(path, config_);
  if (!adapter.ok()) {
    return absl::Status(adapter.status().code(),
                        absl::StrCat("adapter ", name, ": ", adapter.status().message()));
  }
  absl::MutexLock lock(&mu_);
  if (by_name_.count(name)) {
    return absl::AlreadyExistsError(absl::StrCat("name: adapter ", name, " is already loaded"));
  }
  Entry e;
  e.info = {name,
            path,
            adapter->base_model,
            next_id_++,
            adapter->rank,
            adapter->alpha,
            adapter->modules(),
            false,
            0,
            adapter->bytes()};
  e.last_use = ++clock_;
  if (MakeRoom()) SP_RETURN_IF_ERROR(LoadIntoBackend(e, *adapter));
  spdlog::info("adapter {} added: id={} rank={} alpha={} modules={} bytes={} resident={}", name,
               e.info.id, e.info.rank, e.info.alpha, e.info.modules.size(), e.info.bytes,
               e.info.resident);
  by_name_[name] = e.info.id;
  entries_.emplace(e.info.id, std::move(e));
  return absl::OkStatus();
}

absl::Status AdapterManager::Remove(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::NotFoundError(absl::StrCat("name: no adapter ", name, " is loaded"));
  }
  const int64_t id = it->second;
  by_name_.erase(it);
  Entry& e = entries_.at(id);
  e.removed = true;
  spdlog::info("adapter {} removed: id={} held_by_requests={}", name, id, e.info.requests);
  if (e.info.requests == 0) {
    Unload(e);
    entries_.erase(id);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const AdapterRef>> AdapterManager::Acquire(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end()) {
    return absl::InvalidArgumentError("adapter_id: no adapter of that name is loaded");
  }
  Entry& e = entries_.at(it->second);
  if (!e.info.resident) {
    if (!MakeRoom()) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "adapter_id: all ", max_resident_,
          " resident adapters (--max_adapters) are in use by running requests; retry later"));
    }
    // Reloaded from its path (held under the lock: a reload of the same adapter by a
    // concurrent request waits for this one).
    absl::StatusOr<LoraAdapter> adapter = LoadPeftAdapter(e.info.path, config_);
    if (!adapter.ok()) {
      spdlog::error("adapter {}: reload failed: {}", name, adapter.status().ToString());
      return absl::UnavailableError("adapter_id: the adapter could not be reloaded");
    }
    SP_RETURN_IF_ERROR(LoadIntoBackend(e, *adapter));
  }
  ++e.info.requests;
  e.last_use = ++clock_;
  auto* ref = new AdapterRef{e.info.id, e.info.name};
  return std::shared_ptr<const AdapterRef>(ref, [this](const AdapterRef* r) {
    Release(r->id);
    delete r;
  });
}

void AdapterManager::Release(int64_t id) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  Entry& e = it->second;
  --e.info.requests;
  e.last_use = ++clock_;
  if (e.removed && e.info.requests == 0) {
    Unload(e);
    entries_.erase(it);
  }
}

bool AdapterManager::MakeRoom() {
  if (resident_ < max_resident_) return true;
  Entry* victim = nullptr;
  for (auto& [id, e] : entries_) {
    if (!e.info.resident || e.info.requests > 0) continue;
    if (victim == nullptr || e.last_use < victim->last_use) victim = &e;
  }
  if (victim == nullptr) return false;
  spdlog::info("adapter {} evicted (least recently used): id={}", victim->info.name,
               victim->info.id);
  Unload(*victim);
  ++counters_.evictions;
  return true;
}

absl::Status AdapterManager::LoadIntoBackend(Entry& e, const LoraAdapter& adapter) {
  SP_RETURN_IF_ERROR(backend_->LoadAdapter(e.info.id, adapter));
  e.info.resident = true;
  ++resident_;
  ++counters_.loads;
  return absl::OkStatus();
}

void AdapterManager::Unload(Entry& e) {
  if (!e.info.resident) return;
  if (absl::Status st = backend_->UnloadAdapter(e.info.id); !st.ok()) {
    spdlog::error("adapter {}: unload failed: {}", e.info.name, st.ToString());
  }
  e.info.resident = false;
  --resident_;
}

bool AdapterManager::Has(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  return by_name_.count(name) > 0;
}

std::vector<AdapterInfo> AdapterManager::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<AdapterInfo> out;
  for (const auto& [name, id] : by_name_) out.push_back(entries_.at(id).info);
  return out;
}

AdapterCounters AdapterManager::counters() const {
  absl::MutexLock lock(&mu_);
  AdapterCounters c = counters_;
  c.resident = resident_;
  for (const auto& [id, e] : entries_) c.resident_bytes += e.info.resident ? e.info.bytes : 0;
  return c;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseAdapterFlag(
    const std::string& value) {
  std::vector<std::pair<std::string, std::string>> out;
  if (value.empty()) return out;
  for (absl::string_view item : absl::StrSplit(value, ',')) {
    const std::vector<std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (kv.size() != 2 || kv[1].empty()) {
      return absl::InvalidArgumentError("--adapters: expected name=DIR[,name2=DIR2...]");
    }
    SP_RETURN_IF_ERROR(ValidateAdapterName(kv[0], "--adapters: a name"));
    out.emplace_back(kv[0], kv[1]);
  }
  return out;
}

}  // namespace superpose::engine
