// The gRPC front end: validates requests, submits them to the engine and streams the
// answers back through callback reactors that respect flow control.
#pragma once

#include <string>

#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "server/auth.h"
#include "server/call_gate.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "superpose/v1/superpose.grpc.pb.h"

namespace superpose::server {

class SuperposeService final : public v1::Superpose::CallbackService {
 public:
  SuperposeService(const engine::ModelBundle* model, engine::Engine* engine,
                   const std::string& backend_name, const std::string& compute_dtype,
                   const std::string& kv_cache_dtype, int32_t tensor_parallel, Limits limits,
                   Metrics* metrics = nullptr, const Authenticator* auth = nullptr);

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerWriteReactor<v1::GenerateResponse>* GenerateRag(
      grpc::CallbackServerContext* context, const v1::GenerateRagRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

  // Shutdown: new Generate / GenerateRag calls get UNAVAILABLE at once (unary calls and
  // the health service keep answering).
  void StopAccepting() { gate_.Close(); }
  // Waits until every generation call is done (its last message written and its status
  // sent) or `timeout` passes; true when none is left.
  bool WaitForCalls(absl::Duration timeout) { return gate_.WaitIdle(timeout); }

 private:
  // Admits a call through the shutdown gate and starts its reactor (`tenant` labels
  // its per-tenant metrics; empty when authentication failed).
  grpc::ServerWriteReactor<v1::GenerateResponse>* Start(grpc::CallbackServerContext* context,
                                                        const std::string& tenant,
                                                        absl::StatusOr<engine::Request> request,
                                                        std::vector<std::string> doc_ids);

  const engine::ModelBundle* model_;
  engine::Engine* engine_;
  v1::ModelInfo info_;
  Limits limits_;
  Metrics* metrics_;
  Authenticator open_auth_;  // used when no authenticator is given
  const Authenticator* auth_;
  CallGate gate_;
};

grpc::Status ToGrpc(const absl::Status& s);

}  // namespace superpose::server
