#include "client/load/connection.h"

#include <fstream>
#include <iterator>

#include "absl/strings/str_cat.h"

namespace superpose::load {
namespace {

absl::Status ReadPem(const char* flag, const std::string& path, std::string* out) {
  if (path.empty()) return absl::OkStatus();
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& server,
                                                           const Tls& tls,
                                                           grpc::ChannelArguments args) {
  if (tls.ca.empty()) {
    return grpc::CreateCustomChannel(server, grpc::InsecureChannelCredentials(), args);
  }
  grpc::SslCredentialsOptions o;
  for (const auto& [flag, path, out] : {std::tuple{"tls_ca", &tls.ca, &o.pem_root_certs},
                                        std::tuple{"tls_cert", &tls.cert, &o.pem_cert_chain},
                                        std::tuple{"tls_key", &tls.key, &o.pem_private_key}}) {
    if (absl::Status st = ReadPem(flag, *path, out); !st.ok()) return st;
  }
  if (!tls.server_name.empty()) args.SetSslTargetNameOverride(tls.server_name);
  return grpc::CreateCustomChannel(server, grpc::SslCredentials(o), args);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const Settings& s) {
  grpc::ChannelArguments args;
  // Load generators open many streams on one connection: never cap them client-side.
  args.SetInt(GRPC_ARG_MAX_CONCURRENT_STREAMS, 1 << 20);
  return MakeChannel(s.server, s.tls, args);
}

void PrepareContext(const Settings& s, const std::string& affinity, grpc::ClientContext* ctx) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(s.timeout_s * 1000)));
  if (!s.api_key.empty()) ctx->AddMetadata("authorization", "Bearer " + s.api_key);
  if (!affinity.empty()) ctx->AddMetadata(kAffinityHeader, affinity);
}

}  // namespace superpose::load
