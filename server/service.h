// The gRPC front end: validates requests, submits them to the engine and streams the
// answers back through callback reactors that respect flow control. The methods are
// raw (ByteBuffer) callback methods: the service parses each request itself (see
// server/wire.h), checks its bounds, and tokenizes on the bounded WorkPool.
#pragma once

#include <string>

#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "server/auth.h"
#include "server/call_gate.h"
#include "server/chat_prompt.h"
#include "server/convert.h"
#include "server/metrics.h"
#include "server/work_pool.h"
#include "superpose/v1/superpose.grpc.pb.h"

namespace superpose::server {

using RawSuperposeService = v1::Superpose::WithRawCallbackMethod_Generate<
    v1::Superpose::WithRawCallbackMethod_GenerateRag<v1::Superpose::WithRawCallbackMethod_Tokenize<
        v1::Superpose::WithRawCallbackMethod_Detokenize<
            v1::Superpose::WithRawCallbackMethod_GetModelInfo<v1::Superpose::Service>>>>>;

class SuperposeService final : public RawSuperposeService {
 public:
  // `pool`: where tokenizing runs (null: inline, on the gRPC thread).
  SuperposeService(const engine::ModelBundle* model, engine::Engine* engine,
                   const std::string& backend_name, const std::string& compute_dtype,
                   const std::string& kv_cache_dtype, int32_t tensor_parallel, Limits limits,
                   Metrics* metrics = nullptr, const Authenticator* auth = nullptr,
                   WorkPool* pool = nullptr);

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerateRag(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;

  // Shutdown: new Generate / GenerateRag calls get UNAVAILABLE at once (unary calls and
  // the health service keep answering).
  void StopAccepting() { gate_.Close(); }
  // Waits until every generation call is done (its last message written and its status
  // sent) or `timeout` passes; true when none is left.
  bool WaitForCalls(absl::Duration timeout) { return gate_.WaitIdle(timeout); }
  // The admission of generation calls, shared with the HTTP API (server/openai_server.h):
  // its calls are refused and waited for by the same shutdown.
  CallGate* gate() { return &gate_; }
  // The chat template for Generate's `messages` (before serving; null: none).
  void set_chat(const ChatPrompter* chat) { chat_ = chat; }

 private:
  // Authenticates (setting `*tenant`), parses and bounds-checks a request.
  template <typename Req>
  absl::Status Admit(const grpc::CallbackServerContext& context, const grpc::ByteBuffer& bytes,
                     Req* request, std::string* tenant) const;
  // A Generate or GenerateRag call: admitted, parsed and bounded here, then `convert`
  // (request, tenant, reactor) tokenizes it on the pool and starts the reactor.
  template <typename Req, typename Convert>
  grpc::ServerWriteReactor<grpc::ByteBuffer>* StartGeneration(grpc::CallbackServerContext* context,
                                                              const grpc::ByteBuffer& bytes,
                                                              Convert convert);

  const engine::ModelBundle* model_;
  engine::Engine* engine_;
  v1::ModelInfo info_;
  Limits limits_;
  Metrics* metrics_;
  Authenticator open_auth_;  // used when no authenticator is given
  const Authenticator* auth_;
  WorkPool* pool_;
  CallGate gate_;
  const ChatPrompter* chat_ = nullptr;
};

grpc::Status ToGrpc(const absl::Status& s);

// Shared by the gRPC service and the HTTP API (server/openai_server.h). A new request id
// (for requests that bring none).
std::string NewRequestId();
// The engine request of a parsed, bounds-checked (CheckBounds) Generate / GenerateRag
// request of `tenant`: tokenized and every field checked (ToEngineRequest /
// ToEngineRagRequest).
// A request with `messages` is rendered by `chat` first.
absl::StatusOr<engine::Request> BuildEngineRequest(const v1::GenerateRequest& request,
                                                   const std::string& tenant,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits,
                                                   const ChatPrompter* chat = nullptr);
absl::StatusOr<engine::Request> BuildEngineRequest(const v1::GenerateRagRequest& request,
                                                   const std::string& tenant,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits);

}  // namespace superpose::server
