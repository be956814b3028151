#include "server/adapter_service.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server/service.h"
#include "spdlog/spdlog.h"

namespace superpose::server {
namespace {

grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const absl::Status& st) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpc(st));
  return reactor;
}

}  // namespace

AdapterAdminService::AdapterAdminService(engine::AdapterManager* adapters,
                                         const Authenticator* auth,
                                         const std::string& admin_tenants)
    : adapters_(adapters),
      auth_(auth),
      admin_tenants_(absl::StrSplit(admin_tenants, ',', absl::SkipEmpty())) {}

absl::Status AdapterAdminService::Authorize(const grpc::CallbackServerContext& context) const {
  if (auth_ == nullptr || !auth_->enabled()) return absl::OkStatus();
  absl::StatusOr<std::string> tenant = auth_->Tenant(context);
  if (!tenant.ok()) return tenant.status();
  if (std::find(admin_tenants_.begin(), admin_tenants_.end(), *tenant) == admin_tenants_.end()) {
    return absl::PermissionDeniedError(
        "admin rpcs need the key of an admin tenant (--admin_tenants)");
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AdapterAdminService::LoadAdapter(grpc::CallbackServerContext* context,
                                                           const v1::LoadAdapterRequest* request,
                                                           v1::LoadAdapterResponse* response) {
  if (absl::Status st = Authorize(*context); !st.ok()) return Finish(context, st);
  if (request->path().empty()) {
    return Finish(context, absl::InvalidArgumentError("path: the adapter directory is required"));
  }
  absl::Status st = adapters_->Add(request->name(), request->path());
  if (st.ok()) {
    for (const engine::AdapterInfo& info : adapters_->List()) {
      if (info.name == request->name()) ToProto(info, response->mutable_adapter());
    }
  }
  return Finish(context, st);
}

grpc::ServerUnaryReactor* AdapterAdminService::UnloadAdapter(
    grpc::CallbackServerContext* context, const v1::UnloadAdapterRequest* request,
    v1::UnloadAdapterResponse*) {
  if (absl::Status st = Authorize(*context); !st.ok()) return Finish(context, st);
  return Finish(context, adapters_->Remove(request->name()));
}

grpc::ServerUnaryReactor* AdapterAdminService::ListAdapters(grpc::CallbackServerContext* context,
                                                            const v1::ListAdaptersRequest*,
                                                            v1::ListAdaptersResponse* response) {
  if (absl::Status st = Authorize(*context); !st.ok()) return Finish(context, st);
  for (const engine::AdapterInfo& info : adapters_->List()) ToProto(info, response->add_adapters());
  response->set_max_adapters(static_cast<uint32_t>(adapters_->max_resident()));
  return Finish(context, absl::OkStatus());
}

void ToProto(const engine::AdapterInfo& info, v1::AdapterInfo* out) {
  out->set_name(info.name);
  out->set_path(info.path);
  out->set_base_model(info.base_model);
  out->set_rank(static_cast<uint32_t>(info.rank));
  out->set_alpha(info.alpha);
  for (const std::string& m : info.modules) out->add_target_modules(m);
  out->set_resident(info.resident);
  out->set_active_requests(static_cast<uint32_t>(std::max(0, info.requests)));
  out->set_bytes(static_cast<uint64_t>(info.bytes));
}

void AppendAdapterModels(const engine::AdapterManager* adapters, const nlohmann::json& base,
                         nlohmann::json* data) {
  if (adapters == nullptr) return;
  for (const engine::AdapterInfo& info : adapters->List()) {
    nlohmann::json m = base;
    m["id"] = info.name;
    m["parent"] = base["id"];
    m["root"] = info.name;
    m["lora_rank"] = info.rank;
    data->push_back(std::move(m));
  }
}

absl::Status AddFlagAdapters(engine::AdapterManager* adapters, const std::string& flag) {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> list =
      engine::ParseAdapterFlag(flag);
  if (!list.ok()) return list.status();
  for (const auto& [name, dir] : *list) {
    if (absl::Status st = adapters->Add(name, dir); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("--adapters: ", st.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace superpose::server
