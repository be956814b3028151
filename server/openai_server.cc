#include "server/openai_server.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <httplib.h>

#include <deque>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "engine/runtime/tenant_policy.h"
#include "engine/util/status.h"
#include "server/adapter_service.h"
#include "server/http_listener.h"
#include "server/openai_protocol.h"
#include "server/pooled_call.h"
#include "server/request_bounds.h"
#include "server/service.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"

namespace superpose::server {
namespace {

using nlohmann::json;
using openai::ApiError;
using openai::CallPlan;
using openai::Endpoint;

// How long a response waits for engine events before it writes a keep-alive (an SSE
// comment, or a space before a JSON body): a client that went away is noticed by the
// failed write, and its requests are cancelled then.
constexpr absl::Duration kKeepAlive = absl::Milliseconds(200);

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void Reply(httplib::Response& res, const ApiError& e) {
  res.status = e.http_status;
  if (e.http_status == 401) res.set_header("WWW-Authenticate", "Bearer");
  res.set_content(Dump(e.body), "application/json");
}

// cpp-httplib's own refusals, in OpenAI's shape.
ApiError HttplibError(const httplib::Request& req, int status) {
  if (status == 413) {
    // httplib bounds form-encoded bodies (curl -d without a Content-Type) to 8 KiB.
    const bool form = req.get_header_value("Content-Type") == "application/x-www-form-urlencoded";
    return openai::MakeApiError(413,
                                form ? "the request body is form-encoded (at most 8 KiB): send "
                                       "Content-Type: application/json"
                                     : "the request body is larger than --max_request_bytes",
                                "invalid_request_error", "", "request_too_large");
  }
  if (status == 404 || status == 405) {
    return openai::MakeApiError(
        404, absl::StrCat("no such endpoint: ", req.method, " ", req.path, " (see docs/api.md)"),
        "invalid_request_error", "", "not_found");
  }
  return openai::MakeApiError(status, "malformed HTTP request", "invalid_request_error", "", "");
}

// Counts an HTTP call in the service's gate until destroyed.
struct GateTicket {
  explicit GateTicket(CallGate* g) : gate(g) {}
  ~GateTicket() { gate->Exit(); }
  CallGate* gate;
};

}  // namespace

// One request's choices in the engine: their events queued from the engine thread and
// written by the HTTP worker. Held by the handler / content provider and by each
// submitted request's callback until its final event, so the gate ticket (and the
// shutdown's wait) ends only once the engine and the client are both done.
class OpenAiServer::Call : public std::enable_shared_from_this<Call> {
 public:
  Call(engine::Engine* engine, const CallPlan& plan, openai::ResponseMeta meta,
       std::unique_ptr<GateTicket> ticket)
      : engine_(engine),
        meta_(std::move(meta)),
        n_(plan.n),
        stream_(plan.stream),
        include_usage_(plan.include_usage),
        ticket_(std::move(ticket)),
        choices_(plan.num_choices()),
        offsets_(plan.num_choices(), 0) {}

  // Submits choice by choice; on a refusal, cancels those already in and returns it.
  absl::Status Submit(std::vector<engine::Request> requests) {
    std::shared_ptr<Call> self = shared_from_this();
    for (size_t i = 0; i < requests.size(); ++i) {
      const int index = static_cast<int>(i);
      absl::StatusOr<uint64_t> h = engine_->Submit(
          std::move(requests[i]),
          [self, index](engine::StreamEvent&& ev) { self->OnEvent(index, std::move(ev)); });
      if (!h.ok()) {
        CancelAll();
        return h.status();
      }
      absl::MutexLock lock(&mu_);
      handles_.push_back(*h);
    }
    return absl::OkStatus();
  }

  // Waits for the first engine event (of any choice): an error then (queue timeout,
  // shutdown) is the response's HTTP status, as nothing has been written yet. Later
  // errors end the body with an error object.
  absl::Status WaitStarted() {
    absl::MutexLock lock(&mu_);
    auto any = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
    mu_.Await(absl::Condition(&any));
    const engine::StreamEvent& ev = events_.front().second;
    if (ev.finished && !ev.status.ok() && ev.text.empty() && ev.token_ids.empty()) {
      return ev.status;
    }
    return absl::OkStatus();
  }

  void CancelAll() {
    std::vector<uint64_t> handles;
    {
      absl::MutexLock lock(&mu_);
      handles = handles_;
    }
    for (uint64_t h : handles) engine_->Cancel(h);
  }

  // The response is over (written, or the connection lost): choices still running are
  // cancelled. On the HTTP worker, as Pump.
  void CancelUnfinished() {
    if (finished_ < static_cast<int>(choices_.size())) CancelAll();
  }

  // The content provider: writes what arrived (or a keep-alive); false ends the
  // response (the client is gone: every choice is cancelled).
  bool Pump(httplib::DataSink& sink) {
    std::deque<std::pair<int, engine::StreamEvent>> events = Take();
    std::string out;
    for (auto& [index, ev] : events) Merge(index, std::move(ev), &out);
    const bool done = finished_ == static_cast<int>(choices_.size());
    if (done) Finish(&out);
    const absl::Time now = absl::Now();
    if (out.empty() && now - last_write_ >= kKeepAlive) out = stream_ ? ": keep-alive\n\n" : " ";
    if (out.empty()) return true;
    last_write_ = now;
    if (!sink.write(out.data(), out.size())) {
      CancelAll();
      return false;
    }
    if (done) sink.done();
    return true;
  }

  void set_rag(std::vector<std::string> ids, std::shared_ptr<const engine::rag::Spec> spec) {
    doc_ids_ = std::move(ids);
    spec_ = std::move(spec);
  }

 private:
  void OnEvent(int index, engine::StreamEvent&& ev) {
    absl::MutexLock lock(&mu_);
    events_.emplace_back(index, std::move(ev));
  }

  std::deque<std::pair<int, engine::StreamEvent>> Take() {
    absl::MutexLock lock(&mu_);
    auto any = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !events_.empty(); };
    mu_.AwaitWithTimeout(absl::Condition(&any), kKeepAlive);
    return std::exchange(events_, {});
  }

  // Folds an event into its choice; streamed, appends its chunk to `out`.
  void Merge(int index, engine::StreamEvent&& ev, std::string* out) {
    openai::ChoiceOutput& c = choices_[index];
    if (ev.finished && !ev.status.ok()) error_ = ev.status;
    c.text += ev.text;
    c.token_ids.insert(c.token_ids.end(), ev.token_ids.begin(), ev.token_ids.end());
    if (ev.finished) {
      c.finished = true;
      c.finish_reason = ev.finish_reason;
      c.usage = ev.usage;
      c.rag = ev.rag;
      ++finished_;
    }
    if (!stream_) {
      c.logprobs.insert(c.logprobs.end(), ev.logprobs.begin(), ev.logprobs.end());
      return;
    }
    if (!ev.status.ok()) return;
    const engine::FinishReason reason =
        ev.finished ? ev.finish_reason : engine::FinishReason::kNone;
    const bool first = !first_sent_.contains(index);
    if (ev.text.empty() && ev.logprobs.empty() && !ev.finished && !first) return;
    first_sent_.insert(index);
    json chunk =
        openai::StreamChunk(meta_, index, ev.text, ev.logprobs, &offsets_[index], reason, first);
    if (ev.finished && c.rag != nullptr && spec_ != nullptr) {
      chunk["choices"][0]["rag"] = openai::RagJson(*c.rag, doc_ids_, *spec_);
    }
    absl::StrAppend(out, "data: ", Dump(chunk), "\n\n");
  }

  // Every choice is done: the last chunks, or the whole response.
  void Finish(std::string* out) {
    if (!error_.ok()) {
      const ApiError e = openai::ToApiError(error_, meta_.endpoint);
      absl::StrAppend(out, stream_ ? "data: " : "", Dump(e.body), stream_ ? "\n\n" : "");
      if (stream_) absl::StrAppend(out, "data: [DONE]\n\n");
      return;
    }
    if (!stream_) {
      json body = openai::FullResponse(meta_, choices_, n_);
      for (size_t i = 0; i < choices_.size() && spec_ != nullptr; ++i) {
        if (choices_[i].rag != nullptr) {
          body["choices"][i]["rag"] = openai::RagJson(*choices_[i].rag, doc_ids_, *spec_);
        }
      }
      absl::StrAppend(out, Dump(body));
      return;
    }
    if (include_usage_)
      absl::StrAppend(out, "data: ", Dump(openai::UsageChunk(meta_, choices_, n_)), "\n\n");
    absl::StrAppend(out, "data: [DONE]\n\n");
  }

  engine::Engine* engine_;
  const openai::ResponseMeta meta_;
  const int n_;
  const bool stream_;
  const bool include_usage_;
  std::unique_ptr<GateTicket> ticket_;
  std::vector<std::string> doc_ids_;
  std::shared_ptr<const engine::rag::Spec> spec_;
  // The writer's (the HTTP worker's) state.
  std::vector<openai::ChoiceOutput> choices_;
  absl::flat_hash_set<int> first_sent_;
  int finished_ = 0;
  absl::Status error_;
  absl::Time last_write_ = absl::Now();
  absl::Mutex mu_;
  std::deque<std::pair<int, engine::StreamEvent>> events_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> handles_ ABSL_GUARDED_BY(mu_);
  std::vector<int64_t> offsets_;
};

namespace {

// The engine requests of a plan: each prompt's (or the RAG request's) built once and
// copied for its n choices (seed + i, so that they differ and stay reproducible).
absl::StatusOr<std::vector<engine::Request>> BuildAll(const CallPlan& plan,
                                                      const std::string& tenant,
                                                      const engine::Tokenizer& tokenizer,
                                                      const Limits& limits) {
  std::vector<engine::Request> out;
  const std::string id = NewRequestId();
  auto expand = [&](engine::Request req) {
    for (int i = 0; i < plan.n; ++i) {
      engine::Request copy = req;
      copy.sampling.seed = req.sampling.seed + static_cast<uint64_t>(i);
      copy.request_id = absl::StrCat(id, "-", out.size());
      out.push_back(std::move(copy));
    }
  };
  if (plan.rag) {
    absl::StatusOr<engine::Request> req =
        BuildEngineRequest(plan.rag_request, tenant, tokenizer, limits);
    if (!req.ok()) return req.status();
    expand(*std::move(req));
    return out;
  }
  for (const v1::GenerateRequest& p : plan.prompts) {
    absl::StatusOr<engine::Request> req = BuildEngineRequest(p, tenant, tokenizer, limits);
    if (!req.ok()) return req.status();
    expand(*std::move(req));
  }
  return out;
}

absl::Status CheckPlanBounds(const CallPlan& plan, const Limits& limits, int64_t* text_bytes) {
  *text_bytes = 0;
  if (plan.rag) {
    *text_bytes = TextBytes(plan.rag_request);
    return CheckBounds(plan.rag_request, limits);
  }
  for (const v1::GenerateRequest& p : plan.prompts) {
    SP_RETURN_IF_ERROR(CheckBounds(p, limits));
    *text_bytes += TextBytes(p);
  }
  return absl::OkStatus();
}

void LogRequest(const std::vector<engine::Request>& requests, Endpoint endpoint) {
  const engine::Request& r = requests.front();
  absl::StatusOr<engine::LogId> id = engine::LogId::Of(r.request_id);
  spdlog::info("req={} http {} choices={} prompt_tokens={} documents={} max_new_tokens={}",
               id.ok() ? id->str() : "-", endpoint == Endpoint::kChat ? "chat" : "completions",
               requests.size(), r.prompt_ids.size(), r.rag != nullptr ? r.rag->documents.size() : 0,
               r.sampling.max_new_tokens);
}

}  // namespace

OpenAiServer::OpenAiServer(const engine::ModelBundle* model, engine::Engine* engine, Limits limits,
                           const ChatPrompter* chat, Metrics* metrics, const Authenticator* auth,
                           WorkPool* pool, CallGate* gate, OpenAiServerOptions options)
    : model_(model),
      engine_(engine),
      limits_(limits),
      chat_(chat),
      metrics_(metrics),
      auth_(auth),
      pool_(pool),
      gate_(gate),
      options_(options) {}

OpenAiServer::~OpenAiServer() { Stop(); }

void OpenAiServer::Models(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<std::string> tenant =
      auth_->TenantOfAuthorization(req.get_header_value("Authorization"));
  if (!tenant.ok()) return Reply(res, openai::ToApiError(tenant.status()));
  static const int64_t created = absl::ToUnixSeconds(absl::Now());
  const json model = {{"id", model_->name},
                      {"object", "model"},
                      {"created", created},
                      {"owned_by", "superpose"},
                      {"max_model_len", limits_.context_length}};
  json data = json::array({model});
  AppendAdapterModels(adapters_, model, &data);  // server/adapter_service.h
  if (req.matches.size() > 1) {
    for (const json& m : data) {
      if (m["id"] == req.matches[1]) return res.set_content(Dump(m), "application/json");
    }
    return Reply(res, openai::ToApiError(absl::NotFoundError(absl::StrCat(
                          "The model does not exist; this server serves '", model_->name, "'"))));
  }
  const json body = json{{"object", "list"}, {"data", data}};
  res.set_content(Dump(body), "application/json");
}

void OpenAiServer::Generate(const httplib::Request& req, httplib::Response& res, int ep) {
  const Endpoint endpoint = static_cast<Endpoint>(ep);
  if (!gate_->Enter()) {
    return Reply(res, openai::ToApiError(absl::UnavailableError("server is shutting down")));
  }
  auto ticket = std::make_unique<GateTicket>(gate_);
  std::string tenant;
  auto reject = [&](const absl::Status& st) {
    if (metrics_ != nullptr) metrics_->OnRejected(absl::StatusCodeToString(st.code()), tenant);
    spdlog::info("req=- http rejected: {}", absl::StatusCodeToString(st.code()));
    if (std::optional<int64_t> ms = engine::RetryAfterMs(st)) {
      res.set_header("Retry-After", absl::StrCat((*ms + 999) / 1000));
      res.set_header("retry-after-ms", absl::StrCat(*ms));
    }
    Reply(res, openai::ToApiError(st, endpoint));
  };
  absl::StatusOr<std::string> t =
      auth_->TenantOfAuthorization(req.get_header_value("Authorization"));
  if (!t.ok()) return reject(t.status());
  tenant = *std::move(t);
  const json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return reject(openai::Bad("", "the request body is not valid JSON"));
  openai::ParseContext ctx{model_->name, chat_, &limits_, nullptr};
  if (adapters_ != nullptr) {
    ctx.is_adapter = [this](const std::string& name) { return adapters_->Has(name); };
  }
  absl::StatusOr<CallPlan> plan = openai::ParseCall(body, endpoint, ctx);
  if (!plan.ok()) return reject(plan.status());
  int64_t text_bytes = 0;
  if (absl::Status st = CheckPlanBounds(*plan, limits_, &text_bytes); !st.ok()) return reject(st);
  absl::StatusOr<std::vector<engine::Request>> requests = Tokenize(*plan, tenant, text_bytes);
  if (!requests.ok()) return reject(requests.status());
  LogRequest(*requests, endpoint);

  openai::ResponseMeta meta;
  meta.endpoint = endpoint;
  meta.id = absl::StrCat(endpoint == Endpoint::kChat ? "chatcmpl-" : "cmpl-",
                         requests->front().request_id);
  meta.created = absl::ToUnixSeconds(absl::Now());
  meta.model = plan->adapter.empty() ? model_->name : plan->adapter;
  meta.logprobs = plan->logprobs;
  meta.tokenizer = model_->tokenizer.get();
  auto call = std::make_shared<Call>(engine_, *plan, meta, std::move(ticket));
  if (plan->rag) {
    std::vector<std::string> ids;
    for (const v1::RagDocument& d : plan->rag_request.documents()) ids.push_back(d.id());
    call->set_rag(std::move(ids), requests->front().rag);
  }
  if (absl::Status st = call->Submit(*std::move(requests)); !st.ok()) return reject(st);
  if (absl::Status st = call->WaitStarted(); !st.ok()) {
    call->CancelAll();
    return Reply(res, openai::ToApiError(st, endpoint));  // counted by the engine's observer
  }
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      plan->stream ? "text/event-stream" : "application/json",
      [call](size_t, httplib::DataSink& sink) { return call->Pump(sink); },
      [call](bool) { call->CancelUnfinished(); });
}

absl::StatusOr<std::vector<engine::Request>> OpenAiServer::Tokenize(const CallPlan& plan,
                                                                    const std::string& tenant,
                                                                    int64_t text_bytes) {
  const engine::Tokenizer& tokenizer = *model_->tokenizer;
  if (pool_ == nullptr || text_bytes <= kInlineWorkBytes) {
    return BuildAll(plan, tenant, tokenizer, limits_);
  }
  // The same bounded pool as gRPC: a full one refuses (429) instead of queueing.
  absl::Notification done;
  absl::StatusOr<std::vector<engine::Request>> result;
  absl::Status st = pool_->TrySubmit([&] {
    result = BuildAll(plan, tenant, tokenizer, limits_);
    done.Notify();
  });
  if (!st.ok()) return st;
  done.WaitForNotification();
  return result;
}

void OpenAiServer::Route() {
  http_->Get("/v1/models",
             [this](const httplib::Request& req, httplib::Response& res) { Models(req, res); });
  http_->Get(R"(/v1/models/([^/]+))",
             [this](const httplib::Request& req, httplib::Response& res) { Models(req, res); });
  http_->Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(req, res, static_cast<int>(Endpoint::kCompletions));
  });
  http_->Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(req, res, static_cast<int>(Endpoint::kChat));
  });
  // httplib's own refusals (unknown path, body over the limit) in OpenAI's shape too.
  http_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    Reply(res, HttplibError(req, res.status));
  });
  http_->set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
        Reply(res, openai::MakeApiError(500, "internal error", "server_error", "", ""));
      });
}

int OpenAiServer::Start(const std::string& listen) {
  std::string host;
  int port = 0;
  if (!SplitListen(listen, &host, &port)) return -1;
  http_ = NewHttpServer(tls_);
  if (http_ == nullptr) return -1;
  const int threads = options_.threads;
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_socket_options([](socket_t sock) {
    int yes = 1;  // bound exclusively (no SO_REUSEPORT): a second server fails to start
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  http_->set_tcp_nodelay(true);  // stream chunks go out at once
  http_->set_keep_alive_timeout(options_.keep_alive_s);
  http_->set_keep_alive_max_count(1000);
  http_->set_read_timeout(options_.io_timeout_s, 0);
  http_->set_write_timeout(options_.io_timeout_s, 0);
  http_->set_payload_max_length(static_cast<size_t>(options_.max_request_bytes));
  Route();
  return BindAndServe(*http_, host, port, &thread_, [] {});
}

void OpenAiServer::Stop() { StopServing(http_.get(), &thread_); }

}  // namespace superpose::server
