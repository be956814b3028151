#include "server/service.h"

#include <atomic>
#include <deque>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/util/status.h"
#include "server/pooled_call.h"
#include "server/request_bounds.h"
#include "server/tsan_annotations.h"
#include "server/wire.h"
#include "spdlog/spdlog.h"

namespace superpose::server {

grpc::Status ToGrpc(const absl::Status& s) {
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

std::string NewRequestId() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t boot = static_cast<uint64_t>(absl::ToUnixMicros(absl::Now()));
  return absl::StrCat(absl::Hex(boot & 0xffffff), "-", counter.fetch_add(1) + 1);
}

absl::StatusOr<engine::Request> BuildEngineRequest(const v1::GenerateRequest& request,
                                                   const std::string& tenant,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits, const ChatPrompter* chat) {
  if (request.has_messages()) {
    v1::GenerateRequest rendered = request;
    SP_RETURN_IF_ERROR(RenderMessagesInto(chat, &rendered));
    return BuildEngineRequest(rendered, tenant, tokenizer, limits);
  }
  absl::StatusOr<engine::Request> req = ToEngineRequest(request, tokenizer, limits);
  if (req.ok()) req->tenant = tenant;
  return req;
}

absl::StatusOr<engine::Request> BuildEngineRequest(const v1::GenerateRagRequest& request,
                                                   const std::string& tenant,
                                                   const engine::Tokenizer& tokenizer,
                                                   const Limits& limits) {
  absl::StatusOr<engine::Request> req = ToEngineRagRequest(request, tokenizer, limits);
  if (req.ok()) req->tenant = tenant;
  return req;
}

namespace {

// A refusal the client may retry carries the hint as `retry-after-ms` trailing metadata.
void AddRetryHint(grpc::CallbackServerContext* context, const absl::Status& s) {
  if (std::optional<int64_t> ms = engine::RetryAfterMs(s)) {
    context->AddTrailingMetadata("retry-after-ms", absl::StrCat(*ms));
  }
}

// Streams one generation. Engine events arrive on the engine thread and are queued;
// at most one write is in flight. When the client reads slowly, new events are merged
// into the last queued response, so the per-stream buffer stays bounded in count and
// the engine never waits for a client.
//
// Lifetime: owners hold a reference, gRPC (until OnDone), the pooled tokenizing work
// (until it has run) and the engine (until its final event has been handled, which
// every accepted request gets exactly once). The last one deletes the reactor, so the
// engine thread never touches a reactor that gRPC has already finished with, however
// the threads interleave. Start() runs once, when the request has been tokenized (or
// refused); a call cancelled before then is finished without reaching the engine.
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
  struct Action {
    const v1::GenerateResponse* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };

 public:
  // `gate`: the call was admitted through it (Exit when done), or null.
  GenerateReactor(grpc::CallbackServerContext* context, engine::Engine* engine,
                  const engine::Tokenizer* tokenizer, Metrics* metrics, CallGate* gate)
      : context_(context),
        engine_(engine),
        tokenizer_(tokenizer),
        metrics_(metrics),
        deadline_(context->deadline()),
        gate_(gate) {
    // gRPC may run OnCancel on another thread as soon as the handler returns this
    // reactor; gRPC core orders that after the construction, unseen by TSan.
    SP_HAPPENS_BEFORE(&constructed_);
  }

  void Hold() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Release() { Unref(); }
  bool cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }
  // Labels the call's per-tenant metrics (empty: authentication failed).
  void SetTenant(const std::string& tenant) { tenant_ = tenant; }
  void Reject(const grpc::Status& status) {
    Start(absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message()));
  }

  // `doc_ids`: GenerateRag's document ids.
  void Start(absl::StatusOr<engine::Request> request, std::vector<std::string> doc_ids = {}) {
    if (request.ok()) {
      absl::MutexLock lock(&mu_);
      if (cancelled_) request = absl::CancelledError("cancelled");
    }
    if (!request.ok()) {
      if (metrics_ != nullptr)
        metrics_->OnRejected(absl::StatusCodeToString(request.status().code()), tenant_);
      spdlog::info("req=- rejected: {}", absl::StatusCodeToString(request.status().code()));
      Finish(ToGrpc(request.status()));
      return;
    }
    doc_ids_ = std::move(doc_ids);
    if (request->request_id.empty()) request->request_id = NewRequestId();
    response_id_ = request->request_id;
    // Validated by ToEngineRequest (or made by NewRequestId): what log lines print
    // (a keyed hash of it in private mode).
    absl::StatusOr<engine::LogId> id = engine::LogId::Of(request->request_id);
    request_id_ = id.ok() ? *id : engine::LogId();
    if (deadline_ != std::chrono::system_clock::time_point::max()) {
      request->deadline = absl::FromChrono(deadline_);
    }
    spec_ = request->rag;
    if (spec_ == nullptr) {
      spdlog::info("req={} prompt_tokens={} max_new_tokens={}", request_id_.str(),
                   request->prompt_ids.size(), request->sampling.max_new_tokens);
    } else {
      spdlog::info("req={} rag documents={} max_new_tokens={}", request_id_.str(),
                   spec_->documents.size(), request->sampling.max_new_tokens);
    }
    refs_.fetch_add(1, std::memory_order_relaxed);  // the engine's, dropped after its final event
    absl::StatusOr<uint64_t> handle = engine_->Submit(
        *std::move(request), [this](engine::StreamEvent&& ev) { OnEvent(std::move(ev)); });
    if (!handle.ok()) {
      Unref();  // not accepted: no event will come (gRPC still holds its reference)
      // The status code only: messages are for the client (one rule for every log line).
      spdlog::warn("req={} not queued: {}", request_id_.str(),
                   absl::StatusCodeToString(handle.status().code()));
      if (metrics_ != nullptr) {
        metrics_->OnRejected(absl::StatusCodeToString(handle.status().code()), tenant_);
      }
      AddRetryHint(context_, handle.status());
      Finish(ToGrpc(handle.status()));
      return;
    }
    bool cancel;
    {
      absl::MutexLock lock(&mu_);
      handle_ = *handle;
      submitted_ = true;
      cancel = cancelled_ && !final_;
    }
    if (cancel) engine_->Cancel(*handle);
  }

  void OnCancel() override {
    SP_HAPPENS_AFTER(&constructed_);
    bool submitted;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      submitted = submitted_ && !final_;
    }
    if (submitted) engine_->Cancel(handle_);
    SP_HAPPENS_BEFORE(this);  // gRPC runs OnDone after this reaction returns
  }

  void OnWriteDone(bool ok) override {
    SP_HAPPENS_AFTER(&constructed_);
    Action action;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!pending_.empty()) pending_.pop_front();
      if (!ok) {
        broken_ = true;
        pending_.clear();
      }
      action = Pump();
    }
    Run(action);
    SP_HAPPENS_BEFORE(this);
  }

  void OnDone() override {
    SP_HAPPENS_AFTER(this);  // after every other reaction (ordered by gRPC core)
    if (gate_ != nullptr) gate_->Exit();
    Unref();
  }

 private:
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  void OnEvent(engine::StreamEvent&& ev) {
    const bool last = ev.finished;
    Action action;
    {
      absl::MutexLock lock(&mu_);
      action = Merge(std::move(ev));
    }
    Run(action);
    if (last) Unref();
  }

  Action Merge(engine::StreamEvent&& ev) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (ev.finished) {
      final_ = true;
      if (!ev.status.ok()) {
        final_status_ = ToGrpc(ev.status);
        AddRetryHint(context_, ev.status);  // before Finish, which Pump() decides
      } else if (cancelled_) {
        final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
    }
    if (broken_ || cancelled_) return Pump();
    // A failed request's final event with nothing in it ends with the status alone.
    const bool empty = ev.text.empty() && ev.token_ids.empty() && ev.logprobs.empty();
    if (empty && ev.finished && !ev.status.ok()) return Pump();
    // The head of pending_ may be in flight: merge only into a later one.
    v1::GenerateResponse* r;
    if (pending_.size() >= 2 || (pending_.size() == 1 && !writing_)) {
      r = &pending_.back();
    } else {
      pending_.emplace_back();
      r = &pending_.back();
      r->set_request_id(response_id_);
    }
    r->mutable_text()->append(ev.text);
    for (int32_t id : ev.token_ids) r->add_token_ids(static_cast<uint32_t>(id));
    for (const auto& lp : ev.logprobs) ToProto(lp, *tokenizer_, r->add_logprobs());
    if (ev.finished && ev.status.ok()) {
      r->set_finish_reason(ToProto(ev.finish_reason));
      ToProto(ev.usage, r->mutable_usage());
      if (ev.rag != nullptr && spec_ != nullptr)
        ToProto(*ev.rag, doc_ids_, *spec_, r->mutable_rag());
    }
    return Pump();
  }

  // Decides the next write, or the finish once everything is written. The gRPC call
  // itself is made by Run() outside the lock.
  Action Pump() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Action a;
    if (writing_ || finished_) return a;
    if (!pending_.empty() && !broken_) {
      writing_ = true;
      a.write = &pending_.front();  // stable: the front is popped only after the write
      return a;
    }
    if (final_) {
      finished_ = true;
      a.finish = true;
      a.status = broken_ && final_status_.ok()
                     ? grpc::Status(grpc::StatusCode::CANCELLED, "stream closed")
                     : final_status_;
    }
    return a;
  }

  void Run(const Action& a) {
    if (a.write != nullptr) {
      write_buffer_ = Serialize(*a.write);  // one write in flight: the buffer is free
      StartWrite(&write_buffer_);
    } else if (a.finish) {
      Finish(a.status);
    }
  }

  grpc::CallbackServerContext* context_;  // valid until OnDone
  engine::Engine* engine_;
  const engine::Tokenizer* tokenizer_;
  Metrics* metrics_;
  const std::chrono::system_clock::time_point deadline_;
  grpc::ByteBuffer write_buffer_;                  // the response in flight
  std::vector<std::string> doc_ids_;               // GenerateRag: the callers' document ids
  std::shared_ptr<const engine::rag::Spec> spec_;  // GenerateRag
  engine::LogId request_id_;                       // for log lines
  std::string response_id_;                        // the request id as responses echo it
  std::string tenant_;                             // per-tenant metrics; set before Start
  CallGate* gate_;
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool final_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool submitted_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t handle_ = 0;
  char constructed_ = 0;      // the address TSan's construction edge is recorded on
  std::atomic<int> refs_{1};  // gRPC's; the pool's and the engine's are added when they hold it
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

// A reactor for a new generation call, admitted through `gate`; when the server is
// shutting down it has refused the call already (UNAVAILABLE) and `*refused` is set.
GenerateReactor* NewGenerateReactor(grpc::CallbackServerContext* context, engine::Engine* engine,
                                    const engine::Tokenizer* tokenizer, Metrics* metrics,
                                    CallGate* gate, bool* refused) {
  *refused = !gate->Enter();
  auto* reactor =
      new GenerateReactor(context, engine, tokenizer, metrics, *refused ? nullptr : gate);
  if (*refused) reactor->Start(absl::UnavailableError("server is shutting down"));
  return reactor;
}

// Pooled work that waited: the call may have been cancelled, or the server may be
// shutting down, meanwhile; then it ends without tokenizing.
absl::Status BeforeWork(GenerateReactor& reactor, const CallGate& gate) {
  if (reactor.cancelled()) return absl::CancelledError("cancelled");
  if (gate.closed()) return absl::UnavailableError("server is shutting down");
  return absl::OkStatus();
}

}  // namespace

SuperposeService::SuperposeService(const engine::ModelBundle* model, engine::Engine* engine,
                                   const std::string& backend_name,
                                   const std::string& compute_dtype,
                                   const std::string& kv_cache_dtype, int32_t tensor_parallel,
                                   Limits limits, Metrics* metrics, const Authenticator* auth,
                                   WorkPool* pool)
    : model_(model),
      engine_(engine),
      limits_(limits),
      metrics_(metrics),
      auth_(auth != nullptr ? auth : &open_auth_),
      pool_(pool) {
  const engine::ModelConfig& c = model->config;
  info_.set_model_name(model->name);
  info_.set_architecture(c.architecture);
  info_.set_model_type(c.model_type);
  info_.set_vocab_size(c.vocab_size);
  info_.set_hidden_size(c.hidden_size);
  info_.set_intermediate_size(c.intermediate_size);
  info_.set_num_layers(c.num_layers);
  info_.set_num_attention_heads(c.num_heads);
  info_.set_num_kv_heads(c.num_kv_heads);
  info_.set_head_dim(c.head_dim);
  info_.set_context_length(limits.context_length);
  info_.set_dtype(engine::DTypeName(c.dtype));
  info_.set_compute_dtype(compute_dtype);
  info_.set_kv_cache_dtype(kv_cache_dtype);
  info_.set_tokenizer(model->tokenizer->kind());
  info_.set_num_parameters(static_cast<uint64_t>(c.NumParameters()));
  info_.set_backend(backend_name);
  for (int32_t id : c.eos_token_ids) info_.add_eos_token_ids(static_cast<uint32_t>(id));
  if (c.bos_token_id >= 0) info_.set_bos_token_id(static_cast<uint32_t>(c.bos_token_id));
  info_.set_builtin(model->builtin);
  info_.set_tensor_parallel(tensor_parallel);
}

template <typename Req>
absl::Status SuperposeService::Admit(const grpc::CallbackServerContext& context,
                                     const grpc::ByteBuffer& bytes, Req* request,
                                     std::string* tenant) const {
  absl::StatusOr<std::string> t = auth_->Tenant(context);
  if (!t.ok()) return t.status();
  *tenant = *std::move(t);
  SP_RETURN_IF_ERROR(ParseRequest(bytes, request));
  return CheckBounds(*request, limits_);
}

template <typename Req, typename Convert>
grpc::ServerWriteReactor<grpc::ByteBuffer>* SuperposeService::StartGeneration(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer& bytes, Convert convert) {
  bool refused;
  auto* reactor =
      NewGenerateReactor(context, engine_, model_->tokenizer.get(), metrics_, &gate_, &refused);
  if (refused) return reactor;
  auto request = std::make_unique<Req>();
  std::string tenant;
  const absl::Status admitted = Admit(*context, bytes, request.get(), &tenant);
  reactor->SetTenant(tenant);
  if (!admitted.ok()) {
    reactor->Start(admitted);
    return reactor;
  }
  const int64_t text_bytes = TextBytes(*request);
  RunWork(pool_, reactor, text_bytes,
          [this, reactor, request = std::move(request), tenant = std::move(tenant), convert] {
            if (absl::Status st = BeforeWork(*reactor, gate_); !st.ok()) return reactor->Start(st);
            convert(*request, tenant, reactor);
          });
  return reactor;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* SuperposeService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* bytes) {
  return StartGeneration<v1::GenerateRequest>(
      context, *bytes,
      [this](const v1::GenerateRequest& request, const std::string& tenant,
             GenerateReactor* reactor) {
        reactor->Start(BuildEngineRequest(request, tenant, *model_->tokenizer, limits_, chat_));
      });
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* SuperposeService::GenerateRag(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* bytes) {
  return StartGeneration<v1::GenerateRagRequest>(
      context, *bytes,
      [this](const v1::GenerateRagRequest& request, const std::string& tenant,
             GenerateReactor* reactor) {
        absl::StatusOr<engine::Request> req =
            BuildEngineRequest(request, tenant, *model_->tokenizer, limits_);
        std::vector<std::string> ids;
        if (req.ok()) {
          for (const auto& d : request.documents()) ids.push_back(d.id());
        }
        reactor->Start(std::move(req), std::move(ids));
      });
}

grpc::ServerUnaryReactor* SuperposeService::Tokenize(grpc::CallbackServerContext* context,
                                                     const grpc::ByteBuffer* bytes,
                                                     grpc::ByteBuffer* response) {
  auto* call = new PooledUnaryCall();
  auto request = std::make_unique<v1::TokenizeRequest>();
  std::string tenant;
  if (absl::Status st = Admit(*context, *bytes, request.get(), &tenant); !st.ok()) {
    call->Finish(ToGrpc(st));
    return call;
  }
  const int64_t text_bytes = static_cast<int64_t>(request->text().size());
  RunWork(pool_, call, text_bytes, [this, call, request = std::move(request), response] {
    if (call->cancelled())
      return call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    if (absl::Status st = ValidateUtf8(request->text(), "text"); !st.ok()) {
      return call->Finish(ToGrpc(st));
    }
    const bool add_special = !request->has_add_special_tokens() || request->add_special_tokens();
    v1::TokenizeResponse out;
    for (int32_t id : model_->tokenizer->Encode(request->text(), add_special)) {
      out.add_token_ids(static_cast<uint32_t>(id));
      out.add_tokens(model_->tokenizer->IdToToken(id));
    }
    *response = Serialize(out);
    call->Finish(grpc::Status::OK);
  });
  return call;
}

grpc::ServerUnaryReactor* SuperposeService::Detokenize(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* bytes,
                                                       grpc::ByteBuffer* response) {
  auto* call = new PooledUnaryCall();
  auto request = std::make_unique<v1::DetokenizeRequest>();
  std::string tenant;
  absl::Status st = Admit(*context, *bytes, request.get(), &tenant);
  if (st.ok()) st = ValidateTokenIds(request->token_ids(), limits_.vocab_size, "token_ids");
  if (!st.ok()) {
    call->Finish(ToGrpc(st));
    return call;
  }
  // Decoding costs about as much per id as tokenizing does per byte of a short piece.
  const int64_t work_bytes = int64_t{4} * request->token_ids_size();
  RunWork(pool_, call, work_bytes, [this, call, request = std::move(request), response] {
    if (call->cancelled())
      return call->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
    std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
    const bool skip = !request->has_skip_special_tokens() || request->skip_special_tokens();
    v1::DetokenizeResponse out;
    out.set_text(model_->tokenizer->Decode(ids, skip));
    *response = Serialize(out);
    call->Finish(grpc::Status::OK);
  });
  return call;
}

grpc::ServerUnaryReactor* SuperposeService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* bytes,
                                                         grpc::ByteBuffer* response) {
  auto* reactor = context->DefaultReactor();
  v1::GetModelInfoRequest request;
  absl::Status st = auth_->Tenant(*context).status();
  if (st.ok()) st = ParseRequest(*bytes, &request);
  if (st.ok()) *response = Serialize(info_);
  reactor->Finish(ToGrpc(st));
  return reactor;
}

}  // namespace superpose::server
