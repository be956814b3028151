// The channel to the server (plaintext or TLS, as superpose-cli's flags) and the
// metadata of every call: the API key and the affinity key.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "client/load/settings.h"

namespace superpose::load {

// The request header balancers route on (deploy/nginx/superpose.conf, docs/api.md).
inline constexpr char kAffinityHeader[] = "x-superpose-affinity";

// Plaintext, or TLS when tls.ca is set (also superpose-cli's channel); an error names
// the flag of an unreadable file.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& server,
                                                           const Tls& tls,
                                                           grpc::ChannelArguments args);

// superpose-load's: one HTTP/2 connection shared by every call.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const Settings& s);

// Sets the deadline, the bearer key and (when not empty) the affinity header.
void PrepareContext(const Settings& s, const std::string& affinity, grpc::ClientContext* ctx);

}  // namespace superpose::load
