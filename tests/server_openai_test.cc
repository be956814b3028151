// The OpenAI-compatible HTTP API (server/openai_server.h) against a real server:
// response and error shapes, field checks, SSE framing, n > 1, usage, seeds, stop,
// logprobs, auth, queue full, draining, and a client disconnect freeing its KV.
// (Chat requests need the chat template interpreter: see tests/node/openai.test.mjs.)
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"
#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using nlohmann::json;

// Starts a server with the HTTP API on a free port; `extra`: more flags.
struct HttpServer {
  explicit HttpServer(std::vector<std::string> extra, const std::string& log_file = "") {
    static int counter = 0;
    port_file =
        "/tmp/superpose-openai-port-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    std::remove(port_file.c_str());
    std::vector<std::string> args = {"--model=" + testing::Stories260kDir(),
                                     "--http_listen=127.0.0.1:0", "--http_port_file=" + port_file};
    args.insert(args.end(), extra.begin(), extra.end());
    process = std::make_unique<testing::ServerProcess>(args, log_file);
    for (int i = 0; i < 100 && process->ok() && port == 0; ++i) {  // after the gRPC port
      std::ifstream(port_file) >> port;
      if (port == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ~HttpServer() { std::remove(port_file.c_str()); }
  bool ok() const { return process->ok() && port > 0; }
  httplib::Client Client() const {
    httplib::Client cli("127.0.0.1", port);
    cli.set_read_timeout(60, 0);
    return cli;
  }

  std::unique_ptr<testing::ServerProcess> process;
  std::string port_file;
  int port = 0;
};

struct Reply {
  int status = 0;
  json body;
  std::string raw;
  httplib::Headers headers;
};

Reply Post(const HttpServer& s, const std::string& path, const std::string& body,
           const std::string& key = "") {
  httplib::Client cli = s.Client();
  httplib::Headers headers;
  if (!key.empty()) headers.emplace("Authorization", "Bearer " + key);
  auto res = cli.Post(path.c_str(), headers, body, "application/json");
  Reply r;
  if (!res) return r;
  r.status = res->status;
  r.raw = res->body;
  r.headers = res->headers;
  r.body = json::parse(res->body, nullptr, false);
  return r;
}

Reply Post(const HttpServer& s, const std::string& path, const json& body) {
  return Post(s, path, body.dump());
}

// The `data:` payloads of an SSE body, checking the framing: every event is one
// "data: ..." line followed by a blank line (comments, ": ...", are allowed).
std::vector<std::string> SseEvents(const std::string& raw) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < raw.size()) {
    const size_t end = raw.find("\n\n", pos);
    EXPECT_NE(end, std::string::npos) << "an event does not end with a blank line";
    if (end == std::string::npos) break;
    const std::string event = raw.substr(pos, end - pos);
    pos = end + 2;
    if (event.rfind(":", 0) == 0) continue;  // keep-alive comment
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    EXPECT_EQ(event.find('\n'), std::string::npos) << "one line per event";
    out.push_back(event.substr(6));
  }
  return out;
}

json Completion(const std::string& prompt, int max_tokens) {
  return {
      {"model", "stories260k"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
}

class OpenAiTest : public ::testing::Test {
 public:
  static void SetUpTestSuite() {
    http_ = new HttpServer({});
    ASSERT_TRUE(http_->ok()) << "superpose-server with --http_listen did not start";
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(http_->process->Stop(), 0);
    delete http_;
    http_ = nullptr;
  }
  static inline HttpServer* http_ = nullptr;
};

TEST_F(OpenAiTest, ModelsListsTheServedModel) {
  httplib::Client cli = http_->Client();
  auto res = cli.Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  const json body = json::parse(res->body);
  EXPECT_EQ(body["object"], "list");
  ASSERT_EQ(body["data"].size(), 1u);
  EXPECT_EQ(body["data"][0]["id"], "stories260k");
  EXPECT_EQ(body["data"][0]["object"], "model");
  auto one = cli.Get("/v1/models/stories260k");
  ASSERT_TRUE(one);
  EXPECT_EQ(json::parse(one->body)["id"], "stories260k");
  auto missing = cli.Get("/v1/models/gpt-4");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
}

TEST_F(OpenAiTest, CompletionHasOpenAiShapeAndMatchesGrpc) {
  const Reply r = Post(*http_, "/v1/completions", Completion("Once upon a time", 12));
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "text_completion");
  EXPECT_EQ(r.body["model"], "stories260k");
  EXPECT_EQ(r.body["id"].get<std::string>().rfind("cmpl-", 0), 0u);
  ASSERT_EQ(r.body["choices"].size(), 1u);
  const json& c = r.body["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_EQ(c["finish_reason"], "length");
  EXPECT_TRUE(c["logprobs"].is_null());
  const json& u = r.body["usage"];
  EXPECT_EQ(u["completion_tokens"], 12);
  EXPECT_GT(u["prompt_tokens"].get<int>(), 1);
  EXPECT_EQ(u["total_tokens"], u["prompt_tokens"].get<int>() + 12);

  // The same engine as gRPC: greedy text is identical.
  auto stub = v1::Superpose::NewStub(http_->process->Channel());
  grpc::ClientContext ctx;
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_new_tokens(12);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::string text;
  while (reader->Read(&resp)) text += resp.text();
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(c["text"], text);
}

TEST_F(OpenAiTest, StreamIsSseFramedAndEndsWithUsageAndDone) {
  const Reply full = Post(*http_, "/v1/completions", Completion("Once upon a time", 16));
  ASSERT_EQ(full.status, 200);
  json body = Completion("Once upon a time", 16);
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  const Reply r = Post(*http_, "/v1/completions", body.dump());
  ASSERT_EQ(r.status, 200);
  EXPECT_THAT(r.headers.find("Content-Type")->second, ::testing::HasSubstr("text/event-stream"));
  const std::vector<std::string> events = SseEvents(r.raw);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const json chunk = json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "text_completion");
    ASSERT_EQ(chunk["choices"].size(), 1u);
    text += chunk["choices"][0]["text"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null())
      finish = chunk["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, full.body["choices"][0]["text"]);
  EXPECT_EQ(finish, "length");
  const json usage = json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"], full.body["usage"]);
}

TEST_F(OpenAiTest, ChatStreamFormOnlyWithTemplate) {
  // stories260k has no chat template (and this build may have no interpreter): a clear
  // 400 naming messages, before any work.
  const json body = {{"model", "stories260k"},
                     {"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                     {"stream", true}};
  const Reply r = Post(*http_, "/v1/chat/completions", body);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.body["error"]["param"], "messages");
  EXPECT_THAT(r.body["error"]["message"].get<std::string>(), ::testing::HasSubstr("chat template"));
}

TEST_F(OpenAiTest, SeveralChoicesSeedsAndUsage) {
  const json body = {{"model", "stories260k"},
                     {"prompt", {"Once upon a time", "Lily"}},
                     {"n", 3},
                     {"max_tokens", 6},
                     {"seed", 42},
                     {"temperature", 1.0}};
  const Reply a = Post(*http_, "/v1/completions", body);
  ASSERT_EQ(a.status, 200) << a.raw;
  ASSERT_EQ(a.body["choices"].size(), 6u);
  int completion = 0;
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(a.body["choices"][i]["index"], i);
    completion += 6;
  }
  EXPECT_EQ(a.body["usage"]["completion_tokens"], completion);
  // Prompt tokens count once per prompt, not per choice.
  const Reply one = Post(*http_, "/v1/completions", Completion("Once upon a time", 1));
  const Reply two = Post(*http_, "/v1/completions", Completion("Lily", 1));
  EXPECT_EQ(a.body["usage"]["prompt_tokens"], one.body["usage"]["prompt_tokens"].get<int>() +
                                                  two.body["usage"]["prompt_tokens"].get<int>());
  // The same seed gives the same choices.
  const Reply b = Post(*http_, "/v1/completions", body);
  ASSERT_EQ(b.status, 200);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.body["choices"][i]["text"], b.body["choices"][i]["text"]);
}

TEST_F(OpenAiTest, StopStringEndsBeforeIt) {
  const Reply full = Post(*http_, "/v1/completions", Completion("Once upon a time", 24));
  const std::string text = full.body["choices"][0]["text"];
  ASSERT_GT(text.size(), 12u);
  const std::string stop = text.substr(8, 4);
  json body = Completion("Once upon a time", 24);
  body["stop"] = stop;
  const Reply r = Post(*http_, "/v1/completions", body);
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(r.body["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(r.body["choices"][0]["text"], text.substr(0, text.find(stop)));
  body["stop"] = json::array({"zzzz", stop});
  EXPECT_EQ(Post(*http_, "/v1/completions", body).body["choices"][0]["finish_reason"], "stop");
}

TEST_F(OpenAiTest, CompletionLogprobs) {
  json body = Completion("Once upon a time", 5);
  body["logprobs"] = 2;
  const Reply r = Post(*http_, "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.raw;
  const json& lp = r.body["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 5u);
  ASSERT_EQ(lp["token_logprobs"].size(), 5u);
  ASSERT_EQ(lp["top_logprobs"].size(), 5u);
  ASSERT_EQ(lp["text_offset"].size(), 5u);
  std::string joined;
  for (int i = 0; i < 5; ++i) {
    EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0);
    EXPECT_GE(lp["top_logprobs"][i].size(), 1u);
    EXPECT_LE(lp["top_logprobs"][i].size(), 2u);
    EXPECT_EQ(lp["text_offset"][i], joined.size());
    joined += lp["tokens"][i].get<std::string>();
  }
  EXPECT_EQ(joined, r.body["choices"][0]["text"]);  // tokens read as the text does
}

struct ErrorCase {
  std::string body;
  int status;
  std::string param;  // "" for null
};

// The `lazy` extension (gRPC's LazyOptions in JSON) reaches the engine, and usage.lazy
// reports it per prompt (here skipped: the prompt is below --lazy_min_prompt).
TEST_F(OpenAiTest, LazyExtensionAndItsUsage) {
  json body = Completion("Once upon a time", 2);
  body["lazy"] = {{"boundary_layers", {0, 2}}, {"keep_fractions", {0.5, 0.5}}};
  Reply r = Post(*http_, "/v1/completions", body);
  ASSERT_EQ(r.status, 200) << r.raw;
  ASSERT_TRUE(r.body["usage"].contains("lazy")) << r.raw;
  const json& z = r.body["usage"]["lazy"];
  ASSERT_EQ(z.size(), 1u);
  EXPECT_EQ(z[0]["prompt_index"], 0);
  EXPECT_NE(z[0]["skipped"].get<std::string>().find("lazy_min_prompt"), std::string::npos);
  r = Post(*http_, "/v1/completions", Completion("Once upon a time", 2));
  EXPECT_FALSE(r.body["usage"].contains("lazy")) << r.raw;
  body["lazy"] = {{"boundary_layers", {2, 1}}, {"keep_fractions", {0.5, 0.5}}};
  r = Post(*http_, "/v1/completions", body);
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(r.body["error"]["param"], "lazy") << r.raw;
  body["lazy"] = {{"keep", 1}};
  r = Post(*http_, "/v1/completions", body);
  EXPECT_EQ(r.status, 400) << r.raw;
  EXPECT_EQ(r.body["error"]["param"], "lazy") << r.raw;
}

TEST_F(OpenAiTest, ErrorsHaveOpenAiShapeAndNameTheParam) {
  const std::string ok = R"("model": "stories260k", "prompt": "Hi")";
  const std::vector<ErrorCase> cases = {
      {"{not json", 400, ""},
      {"[1, 2]", 400, ""},
      {R"({"prompt": "Hi"})", 400, "model"},
      {R"({"model": 5, "prompt": "Hi"})", 400, "model"},
      {R"({"model": "gpt-4", "prompt": "Hi"})", 404, "model"},
      {R"({"model": "stories260k"})", 400, "prompt"},
      {R"({"model": "stories260k", "prompt": {}})", 400, "prompt"},
      {R"({"model": "stories260k", "prompt": [-1]})", 400, "prompt"},
      {R"({"model": "stories260k", "prompt": [999999]})", 400, "prompt"},
      {"{" + ok + R"(, "temperature": "hot"})", 400, "temperature"},
      {"{" + ok + R"(, "temperature": -1})", 400, "temperature"},
      {"{" + ok + R"(, "top_p": 2})", 400, "top_p"},
      {"{" + ok + R"(, "min_p": 1.5})", 400, "min_p"},
      {"{" + ok + R"(, "top_k": "x"})", 400, "top_k"},
      {"{" + ok + R"(, "presence_penalty": 3})", 400, "presence_penalty"},
      {"{" + ok + R"(, "frequency_penalty": -3})", 400, "frequency_penalty"},
      {"{" + ok + R"(, "repetition_penalty": 0})", 400, "repetition_penalty"},
      {"{" + ok + R"(, "max_tokens": 0})", 400, "max_tokens"},
      {"{" + ok + R"(, "max_tokens": 100000})", 400, "max_tokens"},
      {"{" + ok + R"(, "max_tokens": 1.5})", 400, "max_tokens"},
      {"{" + ok + R"(, "n": 0})", 400, "n"},
      {"{" + ok + R"(, "n": 17})", 400, "n"},
      {"{" + ok + R"(, "seed": "x"})", 400, "seed"},
      {"{" + ok + R"(, "stop": 5})", 400, "stop"},
      {"{" + ok + R"(, "stop": [""]})", 400, "stop"},
      {"{" + ok + R"(, "logprobs": 99})", 400, "logprobs"},
      {"{" + ok + R"(, "stream": "yes"})", 400, "stream"},
      {"{" + ok + R"(, "stream_options": {"include_usage": true}})", 400, "stream_options"},
      {"{" + ok + R"(, "logit_bias": {"5": 10}})", 400, "logit_bias"},
      {"{" + ok + R"(, "echo": true})", 400, "echo"},
      {"{" + ok + R"(, "user": 7})", 400, "user"},
      {"{" + ok + R"(, "documents": [{"text": "x"}]})", 400, "documents"},
      {R"({"model": "stories260k", "prompt": ")" + std::string(20000, 'a') + "\"}", 400, "prompt"},
  };
  for (const ErrorCase& c : cases) {
    SCOPED_TRACE(c.body.substr(0, 120));
    const Reply r = Post(*http_, "/v1/completions", c.body);
    EXPECT_EQ(r.status, c.status) << r.raw;
    ASSERT_TRUE(r.body.is_object()) << r.raw;
    const json& e = r.body["error"];
    ASSERT_TRUE(e.is_object()) << r.raw;
    EXPECT_TRUE(e["message"].is_string());
    EXPECT_TRUE(e["type"].is_string());
    EXPECT_TRUE(e.contains("code"));
    if (c.param.empty()) {
      EXPECT_TRUE(e["param"].is_null()) << r.raw;
    } else {
      EXPECT_EQ(e["param"], c.param) << r.raw;
    }
  }
  const std::vector<ErrorCase> chat = {
      {R"({"model": "stories260k"})", 400, "messages"},
      {R"({"model": "stories260k", "messages": "hi"})", 400, "messages"},
      {R"({"model": "stories260k", "messages": [{"content": "x"}]})", 400, "messages"},
      {R"({"model": "stories260k", "messages": [{"role": "user", "content": 5}]})", 400,
       "messages"},
      {R"({"model": "stories260k", "messages": [{"role": "user", "content": "x"}],
           "top_logprobs": 2})",
       400, "top_logprobs"},
      {R"({"model": "stories260k", "messages": [{"role": "user", "content": "x"}],
           "tools": [{"type": "function"}]})",
       400, "tools"},
  };
  for (const ErrorCase& c : chat) {
    SCOPED_TRACE(c.body);
    const Reply r = Post(*http_, "/v1/chat/completions", c.body);
    EXPECT_EQ(r.status, c.status) << r.raw;
    EXPECT_EQ(r.body["error"]["param"], c.param) << r.raw;
  }
  // Unknown paths and methods, in the same shape.
  httplib::Client cli = http_->Client();
  auto res = cli.Get("/v1/engines");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 404);
  EXPECT_TRUE(json::parse(res->body)["error"].is_object());
  // The server still serves.
  EXPECT_EQ(Post(*http_, "/v1/completions", Completion("Hi", 2)).status, 200);
}

TEST_F(OpenAiTest, HugeBodyRefusedBeforeReading) {
  // Over --max_request_bytes (4 * 16 KiB + 64 KiB for this model): 413, no work.
  const std::string body =
      R"({"model": "stories260k", "prompt": ")" + std::string(200000, 'a') + "\"}";
  const Reply r = Post(*http_, "/v1/completions", body);
  EXPECT_EQ(r.status, 413);
  EXPECT_EQ(r.body["error"]["code"], "request_too_large") << r.raw;
  EXPECT_EQ(Post(*http_, "/v1/completions", Completion("Hi", 2)).status, 200);
}

// The number in a /metrics line `name{labels} value` (0 when absent).
double Metric(int port, const std::string& line_prefix) {
  httplib::Client cli("127.0.0.1", port);
  auto res = cli.Get("/metrics");
  if (!res) return -1;
  std::istringstream in(res->body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(line_prefix + " ", 0) == 0)
      return std::stod(line.substr(line_prefix.size() + 1));
  }
  return 0;
}

// Sends a request and hangs up as soon as the response body starts (a stream's first
// chunk; a non-streamed response's first keep-alive byte); returns whether it did.
bool HangUpOnFirstBytes(const HttpServer& s, const json& body) {
  httplib::Client cli = s.Client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  bool got = false;
  req.content_receiver = [&](const char*, size_t len, uint64_t, uint64_t) {
    got = got || len > 0;
    return !got;  // false: abort, closing the connection
  };
  httplib::Response res;
  httplib::Error err;
  cli.send(req, res, err);
  return got;
}

TEST(OpenAiDisconnect, ClientThatHangsUpIsCancelledAndItsKvFreed) {
  // One sequence at a time: the 8 choices would take seconds; the hang-up cancels the
  // running one and the queued ones at once.
  HttpServer s({"--max_running=1"});
  ASSERT_TRUE(s.ok());
  const int mport = s.process->metrics_port();
  const json body = {{"model", "stories260k"}, {"prompt", "Once upon a time"}, {"n", 8},
                     {"max_tokens", 500},      {"ignore_eos", true},           {"stream", true}};
  EXPECT_TRUE(HangUpOnFirstBytes(s, body));
  const std::string cancelled = R"(superpose_requests_finished_total{reason="cancelled"})";
  const std::string length = R"(superpose_requests_finished_total{reason="length"})";
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < end &&
         (Metric(mport, cancelled) < 1 || Metric(mport, "superpose_kv_blocks_used") != 0 ||
          Metric(mport, "superpose_running_sequences") != 0 ||
          Metric(mport, "superpose_waiting_sequences") != 0)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Metric(mport, "superpose_kv_blocks_used"), 0);
  EXPECT_GE(Metric(mport, cancelled), 7) << "the queued choices are cancelled too";
  EXPECT_LE(Metric(mport, length), 1);
  // A non-streamed request's client hanging up is noticed by the keep-alive writes
  // (a space every 200 ms; the second write after the hang-up fails): the choices not
  // finished by then are cancelled (how many depends on the machine's speed).
  const double cancelled_before = Metric(mport, cancelled);
  const double length_before = Metric(mport, length);
  json unstreamed = body;
  unstreamed["stream"] = false;
  unstreamed["n"] = 16;
  EXPECT_TRUE(HangUpOnFirstBytes(s, unstreamed));
  const auto end2 = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (std::chrono::steady_clock::now() < end2 &&
         Metric(mport, cancelled) + Metric(mport, length) < cancelled_before + length_before + 16) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(Metric(mport, "superpose_kv_blocks_used"), 0);
  EXPECT_GE(Metric(mport, cancelled), cancelled_before + 1) << "the last choices never ran";
  EXPECT_EQ(s.process->Stop(), 0);
}

TEST(OpenAiAdmission, QueueFullIs429AndDrainingIs503) {
  HttpServer s({"--max_running=1", "--max_waiting=1", "--shutdown_grace_s=3"});
  ASSERT_TRUE(s.ok());
  // Four choices: one runs, one waits, the third is refused: the whole request is.
  const json body = {{"model", "stories260k"},
                     {"prompt", "Once"},
                     {"n", 4},
                     {"max_tokens", 400},
                     {"ignore_eos", true}};
  const Reply r = Post(s, "/v1/completions", body);
  EXPECT_EQ(r.status, 429) << r.raw;
  EXPECT_EQ(r.body["error"]["type"], "rate_limit_error");
  EXPECT_EQ(r.headers.count("Retry-After"), 1u);
  EXPECT_EQ(r.headers.count("retry-after-ms"), 1u);
  // The refused request's choices that were queued are cancelled: wait for them to go.
  const int mport = s.process->metrics_port();
  for (int i = 0; i < 500 && (Metric(mport, "superpose_running_sequences") != 0 ||
                              Metric(mport, "superpose_waiting_sequences") != 0);
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Draining: while a long stream runs, SIGTERM; new requests then get 503 (refused at
  // the gate, or failed in the queue by the engine's shutdown) until the port closes.
  std::atomic<bool> started{false};
  std::thread streaming([&] {
    httplib::Client cli = s.Client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    json b = body;
    b["n"] = 1;
    b["max_tokens"] = 500;
    b["stream"] = true;
    b["logprobs"] = 20;  // slower steps: a longer window
    req.body = b.dump();
    req.set_header("Content-Type", "application/json");
    std::string raw;
    req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
      raw.append(data, len);
      started = true;
      return true;
    };
    httplib::Response res;
    httplib::Error err;
    EXPECT_TRUE(cli.send(req, res, err));
    EXPECT_EQ(res.status, 200);
    EXPECT_NE(raw.find("data: [DONE]"), std::string::npos);
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  s.process->Signal(SIGTERM);
  Reply refused;
  for (int i = 0; i < 2000 && refused.status != 503; ++i) {
    refused = Post(s, "/v1/completions", Completion("Hi", 2).dump());
    if (refused.status == 0) break;  // the port is closed: the drain is over
  }
  EXPECT_EQ(refused.status, 503) << refused.raw;
  if (refused.status == 503) {
    EXPECT_EQ(refused.body["error"]["type"], "server_error");
  }
  streaming.join();
  EXPECT_EQ(s.process->WaitExit(std::chrono::seconds(20)), 0);
}

TEST(OpenAiAuth, BearerKeysAndTenants) {
  const std::string keys = "/tmp/superpose-openai-keys-" + std::to_string(getpid());
  std::ofstream(keys) << "sk-alpha tenant-a\nsk-beta tenant-b\n";
  HttpServer s({"--api_keys_file=" + keys});
  ASSERT_TRUE(s.ok());
  const std::string body = Completion("Hi", 2).dump();
  const Reply none = Post(s, "/v1/completions", body);
  EXPECT_EQ(none.status, 401);
  EXPECT_EQ(none.body["error"]["code"], "invalid_api_key");
  EXPECT_EQ(Post(s, "/v1/completions", body, "sk-wrong").status, 401);
  EXPECT_EQ(Post(s, "/v1/completions", body, "sk-alpha").status, 200);
  httplib::Client cli = s.Client();
  auto models = cli.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(models->status, 401);
  // The tenant's metrics count the HTTP request.
  const double a =
      Metric(s.process->metrics_port(),
             R"(superpose_tenant_requests_finished_total{tenant="tenant-a",reason="length"})");
  EXPECT_EQ(a, 1);
  EXPECT_EQ(s.process->Stop(), 0);
  std::remove(keys.c_str());
}

}  // namespace
}  // namespace superpose

namespace superpose {
namespace {

TEST(OpenAiGrpcMessages, WithoutATemplateIsInvalidArgumentNamingMessages) {
  HttpServer s({});
  ASSERT_TRUE(s.ok());
  auto stub = v1::Superpose::NewStub(s.process->Channel());
  v1::GenerateRequest req;
  v1::ChatMessage* m = req.mutable_messages()->add_messages();
  m->set_role("user");
  m->set_content("Hi");
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
  }
  const grpc::Status st = reader->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), ::testing::StartsWith("messages"));
  // Bounds before rendering: an empty chat.
  v1::GenerateRequest empty;
  empty.mutable_messages();
  grpc::ClientContext ctx2;
  auto r2 = stub->Generate(&ctx2, empty);
  while (r2->Read(&resp)) {
  }
  const grpc::Status st2 = r2->Finish();
  EXPECT_EQ(st2.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st2.error_message(), ::testing::HasSubstr("messages has 0 messages"));
  EXPECT_EQ(s.process->Stop(), 0);
}

// Chat completions through the chat template interpreter (a ChatML template given with
// --chat_template: stories260k has none).
class OpenAiChatTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    template_file_ = "/tmp/superpose-chatml-" + std::to_string(getpid()) + ".jinja";
    std::ofstream(template_file_)
        << "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + "
           "'\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    http_ = new HttpServer({"--chat_template=" + template_file_});
  }
  static void TearDownTestSuite() {
    delete http_;
    std::remove(template_file_.c_str());
  }
  void SetUp() override {
    ASSERT_TRUE(http_->ok()) << "superpose-server with --chat_template did not start";
  }
  // The ChatML text chatml-bos.jinja renders, without the leading "<s>".
  static std::string Rendered() {
    return "<|im_start|>system\nYou tell stories.<|im_end|>\n<|im_start|>user\nTell me about "
           "Lily.<|im_end|>\n<|im_start|>assistant\n";
  }
  static json Messages() {
    return json::array({{{"role", "system"}, {"content", "You tell stories."}},
                        {{"role", "user"}, {"content", "Tell me about Lily."}}});
  }
  static inline std::string template_file_;
  static inline HttpServer* http_ = nullptr;
};

TEST_F(OpenAiChatTest, ChatEqualsTheRenderedCompletionWithOneBos) {
  const json chat = {
      {"model", "stories260k"}, {"messages", Messages()}, {"max_tokens", 10}, {"temperature", 0}};
  const Reply c = Post(*http_, "/v1/chat/completions", chat);
  ASSERT_EQ(c.status, 200) << c.raw;
  EXPECT_EQ(c.body["object"], "chat.completion");
  EXPECT_EQ(c.body["choices"][0]["message"]["role"], "assistant");
  // /v1/completions adds BOS to a text prompt: the same tokens as "<s>" + text.
  const Reply p = Post(*http_, "/v1/completions", Completion(Rendered(), 10));
  ASSERT_EQ(p.status, 200);
  EXPECT_EQ(c.body["usage"]["prompt_tokens"], p.body["usage"]["prompt_tokens"]);
  EXPECT_EQ(c.body["choices"][0]["message"]["content"], p.body["choices"][0]["text"]);
  // gRPC's messages: the same prompt.
  auto stub = v1::Superpose::NewStub(http_->process->Channel());
  v1::GenerateRequest req;
  for (const json& m : Messages()) {
    v1::ChatMessage* out = req.mutable_messages()->add_messages();
    out->set_role(m["role"]);
    out->set_content(m["content"]);
  }
  req.mutable_sampling()->set_temperature(0);
  req.mutable_sampling()->set_max_new_tokens(10);
  grpc::ClientContext ctx;
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::string text;
  uint32_t prompt_tokens = 0;
  while (reader->Read(&resp)) {
    text += resp.text();
    if (resp.has_usage()) prompt_tokens = resp.usage().prompt_tokens();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(text, c.body["choices"][0]["message"]["content"]);
  EXPECT_EQ(prompt_tokens, c.body["usage"]["prompt_tokens"]);
}

TEST_F(OpenAiChatTest, ChatStreamChunksAndRagReport) {
  json chat = {{"model", "stories260k"}, {"messages", Messages()}, {"max_tokens", 6},
               {"stream", true},         {"logprobs", true},       {"top_logprobs", 1}};
  const Reply r = Post(*http_, "/v1/chat/completions", chat.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  const std::vector<std::string> events = SseEvents(r.raw);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json first = json::parse(events.front());
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  json rag = {{"model", "stories260k"},
              {"messages", Messages()},
              {"max_tokens", 6},
              {"documents",
               {{{"id", "a"}, {"text", "Lily played in the park."}},
                {{"id", "b"}, {"text", "Tom had a red ball."}}}},
              {"rag", {{"top_k", 1}}}};
  const Reply g = Post(*http_, "/v1/chat/completions", rag);
  ASSERT_EQ(g.status, 200) << g.raw;
  const json& report = g.body["choices"][0]["rag"];
  ASSERT_EQ(report["documents"].size(), 2u);
  EXPECT_EQ(report["documents"][0]["id"], "a");
  EXPECT_EQ(int(report["documents"][0]["kept"].get<bool>()) +
                int(report["documents"][1]["kept"].get<bool>()),
            1);
  rag["rag"] = {{"mode", "RAG_MODE_BOGUS"}};
  EXPECT_EQ(Post(*http_, "/v1/chat/completions", rag).body["error"]["param"], "rag");
}

// The privacy rule on the HTTP path: at the most verbose log level, no prompt, message,
// document, stop string or generated text reaches the log, the metrics or an error body.
TEST(OpenAiPrivacyTest, LogsAndErrorsNeverCarryText) {
  const std::string log = "/tmp/superpose-openai-log-" + std::to_string(getpid());
  const std::vector<std::string> secrets = {"Zebracorn", "Quokkaville", "Xylophonia",
                                            "Marzipantown", "Snorkelwizard"};
  std::vector<std::string> outputs, errors;
  std::string metrics;
  {
    HttpServer s({"--log_level=trace", "--chat_template=" + std::string(SP_SOURCE_DIR) +
                                           "/tests/chat_templates/chatml-bos.jinja"},
                 log);
    ASSERT_TRUE(s.ok());
    Reply r = Post(s, "/v1/completions",
                   std::string(R"({"model":"stories260k","prompt":"Zebracorn went to the park.",)"
                               R"("max_tokens":24,"temperature":0,"stop":["Quokkaville"]})"));
    ASSERT_EQ(r.status, 200) << r.raw;
    outputs.push_back(r.body["choices"][0]["text"].get<std::string>());
    r = Post(s, "/v1/chat/completions",
             std::string(R"({"model":"stories260k","stream":true,"max_tokens":16,"temperature":0,)"
                         R"("messages":[{"role":"user","content":"Quokkaville had a dog."}]})"));
    ASSERT_EQ(r.status, 200) << r.raw;
    r = Post(
        s, "/v1/chat/completions",
        std::string(R"({"model":"stories260k","max_tokens":16,"temperature":0,)"
                    R"("documents":[{"id":"d1","text":"Xylophonia is a town with a red ball."},)"
                    R"({"id":"d2","text":"Tom had a cat."}],)"
                    R"("messages":[{"role":"user","content":"Where is Marzipantown?"}]})"));
    ASSERT_EQ(r.status, 200) << r.raw;
    outputs.push_back(r.body["choices"][0]["message"]["content"].get<std::string>());
    // Refusals: malformed JSON, a wrong type, a bad value beside text, an unknown key.
    for (const std::string& bad :
         {std::string(R"({"model":"stories260k","prompt":"Snorkelwizard)"),
          std::string(R"({"model":"stories260k","prompt":"Snorkelwizard","temperature":"hot"})"),
          std::string(R"({"model":"stories260k","prompt":"Snorkelwizard","top_p":7,)"
                      R"("stop":["Snorkelwizard"]})"),
          std::string(R"({"model":"stories260k","messages":"Snorkelwizard"})")}) {
      r = Post(s, "/v1/completions", bad);
      EXPECT_EQ(r.status, 400) << r.raw;
      errors.push_back(r.raw);
    }
    r = Post(s, "/v1/chat/completions", std::string(R"({"model":"stories260k","prompt":"x"})"),
             "Snorkelwizard");
    errors.push_back(r.raw);
    httplib::Client cli("127.0.0.1", s.process->metrics_port());
    auto m = cli.Get("/metrics");
    ASSERT_TRUE(m);
    metrics = m->body;
    EXPECT_EQ(s.process->Stop(), 0);
  }
  std::ifstream in(log);
  std::stringstream all;
  all << in.rdbuf();
  const std::string text = all.str();
  std::remove(log.c_str());
  EXPECT_NE(text.find(" http "), std::string::npos) << text;  // the requests are logged...
  std::string all_errors;                                     // the refusals name their fields
  for (const std::string& e : errors) all_errors += e + "\n";
  for (const char* field :
       {"\"param\":\"temperature\"", "\"param\":\"top_p\"", "\"param\":\"messages\""}) {
    EXPECT_NE(all_errors.find(field), std::string::npos) << field << " in " << all_errors;
  }
  for (const std::string& secret : secrets) {  // ...and none of their text
    EXPECT_EQ(text.find(secret), std::string::npos) << secret;
    EXPECT_EQ(metrics.find(secret), std::string::npos) << secret;
    for (const std::string& e : errors) EXPECT_EQ(e.find(secret), std::string::npos) << e;
  }
  for (const std::string& o : outputs) {
    if (o.size() >= 12) {
      EXPECT_EQ(text.find(o), std::string::npos) << "generated: " << o;
    }
  }
}

}  // namespace
}  // namespace superpose
