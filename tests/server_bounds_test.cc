// Request bounds end to end, over real gRPC against a real superpose-server with the
// stories260k model: text fields over --max_text_bytes are refused before tokenizing,
// naming the field; malformed payloads and unknown enum values are INVALID_ARGUMENT;
// max_new_tokens = 0 means the server default; tokenizing runs on a bounded pool, so a
// small request finishes while large ones tokenize, a full pool answers
// RESOURCE_EXHAUSTED, and cancelling queued or tokenizing calls leaks nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "superpose/v1/superpose.grpc.pb.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

namespace v1 = superpose::v1;
using ::testing::HasSubstr;

// stories260k: a 512-token window, so --max_text_bytes defaults to 512 * 32.
constexpr int64_t kMaxText = 512 * 32;

// Drains a Generate / GenerateRag stream.
struct Streamed {
  grpc::Status status;
  v1::GenerateResponse last;
  int responses = 0;
};
template <typename Reader>
Streamed Drain(Reader reader) {
  Streamed s;
  v1::GenerateResponse r;
  while (reader->Read(&r)) {
    ++s.responses;
    s.last = r;
  }
  s.status = reader->Finish();
  return s;
}

v1::GenerateRequest SmallGenerate(uint32_t max_new_tokens) {
  v1::GenerateRequest req;
  req.set_text("Once upon a time");
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_new_tokens(max_new_tokens);
  req.set_ignore_eos(true);
  return req;
}

v1::GenerateRagRequest SmallRag() {
  v1::GenerateRagRequest req;
  req.set_preamble("Read the stories.");
  req.add_documents()->set_text("Tom had a red ball.");
  req.add_documents()->set_text("Lily saw a big dog.");
  req.set_query("What did Tom have?");
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_new_tokens(4);
  req.set_ignore_eos(true);
  return req;
}

class BoundsTest : public testing::SharedServerTest<BoundsTest> {
 public:
  static std::vector<std::string> ServerArgs() {
    return {"--model=" + testing::Stories260kDir(), "--default_max_new_tokens=7"};
  }

 protected:
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    channel_ = server_->Channel();
    stub_ = v1::Superpose::NewStub(channel_);
  }
  Streamed Generate(const v1::GenerateRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return Drain(stub_->Generate(&ctx, req));
  }
  Streamed Rag(const v1::GenerateRagRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return Drain(stub_->GenerateRag(&ctx, req));
  }
  void ExpectServing() {
    Streamed s = Generate(SmallGenerate(3));
    EXPECT_TRUE(s.status.ok()) << s.status.error_message();
    EXPECT_EQ(s.last.usage().generated_tokens(), 3u);
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Superpose::Stub> stub_;
};

void ExpectNamed(const grpc::Status& st, const std::string& field, const std::string& what) {
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
      << what << ": " << st.error_message();
  EXPECT_THAT(st.error_message(), HasSubstr(field)) << what;
}

TEST_F(BoundsTest, OversizedTextFieldsNameTheFieldAndTheLimit) {
  const std::string big(kMaxText + 1, 'a');
  const std::string limit = std::to_string(kMaxText);
  {
    v1::GenerateRequest req = SmallGenerate(4);
    req.set_text(big);
    Streamed s = Generate(req);
    ExpectNamed(s.status, "text has " + std::to_string(big.size()) + " bytes", "text");
    EXPECT_THAT(s.status.error_message(), HasSubstr(limit));
    EXPECT_EQ(s.responses, 0);
  }
  {
    v1::GenerateRequest req = SmallGenerate(4);
    req.add_stop(std::string(257, 's'));
    ExpectNamed(Generate(req).status, "stop[0] has 257 bytes", "stop");
    req = SmallGenerate(4);
    req.set_request_id(std::string(129, 'r'));
    ExpectNamed(Generate(req).status, "request_id", "request_id");
  }
  struct RagCase {
    std::string field;
    std::function<void(v1::GenerateRagRequest*)> mutate;
  };
  const std::vector<RagCase> rag_cases = {
      {"preamble has", [&](v1::GenerateRagRequest* r) { r->set_preamble(big); }},
      {"query has", [&](v1::GenerateRagRequest* r) { r->set_query(big); }},
      {"postamble has", [&](v1::GenerateRagRequest* r) { r->set_postamble(big); }},
      {"documents[1].text has",
       [&](v1::GenerateRagRequest* r) { r->mutable_documents(1)->set_text(big); }},
      {"documents[0].id has 257 bytes",
       [&](v1::GenerateRagRequest* r) { r->mutable_documents(0)->set_id(std::string(257, 'i')); }},
      {"stop[0] has", [&](v1::GenerateRagRequest* r) { r->add_stop(std::string(300, 's')); }},
      // Each path (preamble + document + query + postamble) must fit on its own...
      {"documents[0].text with the preamble",
       [&](v1::GenerateRagRequest* r) {
         r->set_preamble(std::string(kMaxText / 2, 'p'));
         r->mutable_documents(0)->set_text(std::string(kMaxText / 2, 'd'));
       }},
      // ...and in naive mode all of them together.
      {"documents (rag.mode = NAIVE",
       [&](v1::GenerateRagRequest* r) {
         r->mutable_rag()->set_mode(v1::RAG_MODE_NAIVE);
         r->mutable_documents(0)->set_text(std::string(kMaxText / 2, 'd'));
         r->mutable_documents(1)->set_text(std::string(kMaxText / 2, 'e'));
       }},
  };
  for (const RagCase& c : rag_cases) {
    v1::GenerateRagRequest req = SmallRag();
    c.mutate(&req);
    Streamed s = Rag(req);
    ExpectNamed(s.status, c.field, c.field);
    EXPECT_EQ(s.responses, 0) << c.field;
  }
  {
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text(big);
    v1::TokenizeResponse resp;
    const grpc::Status st = stub_->Tokenize(&ctx, req, &resp);
    ExpectNamed(st, "text has", "Tokenize.text");
    EXPECT_THAT(st.error_message(), HasSubstr(limit));
  }
  {
    grpc::ClientContext ctx;
    v1::DetokenizeRequest req;
    for (int64_t i = 0; i <= kMaxText; ++i) req.add_token_ids(5);
    v1::DetokenizeResponse resp;
    ExpectNamed(stub_->Detokenize(&ctx, req, &resp), "token_ids has", "Detokenize.token_ids");
  }
  // A text field at the limit is tokenized (and then checked against the window).
  {
    v1::GenerateRequest req = SmallGenerate(4);
    req.set_text(std::string(kMaxText, 'a'));
    ExpectNamed(Generate(req).status, "prompt has", "text at the limit");
  }
  ExpectServing();
}

// The whole message is bounded too (--max_request_bytes, 4 * 16384 + 64 KiB here):
// gRPC itself refuses a larger one with RESOURCE_EXHAUSTED.
TEST_F(BoundsTest, OversizedMessageIsRefusedByGrpc) {
  v1::GenerateRagRequest req = SmallRag();
  for (int i = 0; i < 10; ++i) req.add_documents()->set_text(std::string(kMaxText - 100, 'x'));
  ASSERT_GT(req.ByteSizeLong(), 4u * kMaxText + 65536);
  Streamed s = Rag(req);
  EXPECT_EQ(s.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << s.status.error_message();
  ExpectServing();
}

TEST_F(BoundsTest, MalformedPayloadsAreInvalidArgumentNamingTheRequestType) {
  std::mt19937 rng(1234);
  std::string garbage(64, '\0');
  for (char& c : garbage) c = static_cast<char>(rng());
  garbage[0] = '\xff';  // field 31, wire type 7: no valid message starts like this
  const std::string truncated = [] {
    v1::GenerateRequest req = SmallGenerate(4);
    std::string wire = req.SerializeAsString();
    return wire.substr(0, 6);  // inside the text field
  }();
  const std::vector<std::pair<std::string, std::string>> methods = {
      {"Generate", "superpose.v1.GenerateRequest"},
      {"GenerateRag", "superpose.v1.GenerateRagRequest"},
      {"Tokenize", "superpose.v1.TokenizeRequest"},
      {"Detokenize", "superpose.v1.DetokenizeRequest"},
      {"GetModelInfo", "superpose.v1.GetModelInfoRequest"}};
  for (const auto& [method, type] : methods) {
    for (const std::string& bytes : {garbage, truncated}) {
      v1::GenerateRequest probe;
      ASSERT_FALSE(probe.ParseFromString(bytes));
      const grpc::Status st = testing::RawCall(channel_, method, bytes);
      EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
          << method << ": " << st.error_message();
      EXPECT_THAT(st.error_message(), HasSubstr("not a valid " + type)) << method;
    }
  }
  // An empty payload is a valid (empty) message: the usual field checks apply.
  ExpectNamed(testing::RawCall(channel_, "Generate", ""), "prompt", "empty Generate");
  EXPECT_TRUE(testing::RawCall(channel_, "GetModelInfo", "").ok());
  ExpectServing();
}

TEST_F(BoundsTest, UnknownEnumValuesAndFieldsNameTheField) {
  auto unknown = [](google::protobuf::Message* m) {
    return m->GetReflection()->MutableUnknownFields(m);
  };
  {
    v1::GenerateRagRequest req = SmallRag();
    unknown(req.mutable_rag())->AddVarint(1, 99);  // rag.mode = 99
    Streamed s = Rag(req);
    ExpectNamed(s.status, "rag.mode: unknown value 99", "rag.mode");
  }
  {
    v1::GenerateRagRequest req = SmallRag();
    unknown(req.mutable_rag())->AddVarint(3, 7);  // rag.positions = 7
    ExpectNamed(Rag(req).status, "rag.positions: unknown value 7", "rag.positions");
  }
  {
    v1::GenerateRagRequest req = SmallRag();
    unknown(req.mutable_documents(1))->AddVarint(77, 1);
    ExpectNamed(Rag(req).status, "unknown field (number 77, in documents[1])", "field 77");
  }
  {
    v1::GenerateRequest req = SmallGenerate(4);
    unknown(req.mutable_sampling())->AddLengthDelimited(1, "x");  // wrong wire type
    ExpectNamed(Generate(req).status, "sampling.max_new_tokens has the wrong wire type",
                "wire type");
  }
  {
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text("hello");
    unknown(&req)->AddVarint(9, 1);
    v1::TokenizeResponse resp;
    ExpectNamed(stub_->Tokenize(&ctx, req, &resp), "TokenizeRequest has an unknown field",
                "Tokenize field 9");
  }
  ExpectServing();
}

TEST_F(BoundsTest, MaxNewTokensZeroMeansTheServerDefault) {
  Streamed s = Generate(SmallGenerate(0));
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.usage().generated_tokens(), 7u);  // --default_max_new_tokens=7
  v1::GenerateRagRequest rag = SmallRag();
  rag.mutable_sampling()->set_max_new_tokens(0);
  s = Rag(rag);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.usage().generated_tokens(), 7u);
}

// A server whose pool has one thread and room for `queue` waiting requests, with a
// large text bound so that one prompt takes a long while to tokenize (and is then
// refused: it does not fit the 512-token window).
class PoolTest : public ::testing::Test {
 protected:
  static constexpr int64_t kBigText = 3 << 20;
  void Start(int queue, std::vector<std::string> args = {}) {
    args.insert(args.end(), {"--model=" + testing::Stories260kDir(), "--tokenize_threads=1",
                             "--tokenize_queue=" + std::to_string(queue),
                             "--max_text_bytes=" + std::to_string(kBigText)});
    server_ = std::make_unique<testing::ServerProcess>(args);
    ASSERT_TRUE(server_->ok());
    stub_ = v1::Superpose::NewStub(server_->Channel());
  }
  static v1::GenerateRequest BigGenerate() {
    v1::GenerateRequest req = SmallGenerate(4);
    std::string text;
    while (static_cast<int64_t>(text.size()) + 64 < kBigText) {
      text += "Once upon a time, there was a little girl named Lily. ";
    }
    req.set_text(text);
    return req;
  }
  void ExpectNoLeak() {
    const int mport = server_->metrics_port();
    double used = -1, running = -1;
    for (int i = 0; i < 200; ++i) {
      used = testing::MetricValue(mport, "superpose_kv_blocks_used");
      running = testing::MetricValue(mport, "superpose_running_sequences");
      if (used == 0 && running == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(used, 0);
    EXPECT_EQ(running, 0);
  }
  Streamed Small() {
    grpc::ClientContext ctx;
    return Drain(stub_->Generate(&ctx, SmallGenerate(2)));
  }

  std::unique_ptr<testing::ServerProcess> server_;
  std::unique_ptr<v1::Superpose::Stub> stub_;
};

// Several near-limit prompts tokenize on the one pool thread; a small request (whose
// text tokenizes inline) finishes before any of them does.
TEST_F(PoolTest, SmallRequestFinishesWhileLargeOnesTokenize) {
  Start(8);
  std::mutex mu;
  std::vector<std::string> order;
  std::vector<grpc::Status> big_status(3);
  std::vector<std::thread> bigs;
  const v1::GenerateRequest big = BigGenerate();
  for (int i = 0; i < 3; ++i) {
    bigs.emplace_back([&, i] {
      grpc::ClientContext ctx;
      big_status[i] = Drain(stub_->Generate(&ctx, big)).status;
      std::lock_guard<std::mutex> lock(mu);
      order.push_back("big");
    });
  }
  // Give the large requests time to arrive (this orders the scenario; the assertion
  // is on the order of completion, not on time).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const Streamed small = Small();
  {
    std::lock_guard<std::mutex> lock(mu);
    order.push_back("small");
  }
  for (auto& t : bigs) t.join();
  ASSERT_TRUE(small.status.ok()) << small.status.error_message();
  for (const grpc::Status& st : big_status) {
    // Tokenized in full, then refused by the context window.
    ExpectNamed(st, "prompt has", "big prompt");
  }
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], "small");
  ExpectNoLeak();
}

// One thread and one waiting slot: of several large requests sent at once, those that
// find the queue full get RESOURCE_EXHAUSTED at once; the server serves on.
TEST_F(PoolTest, FullPoolIsResourceExhausted) {
  Start(1);
  std::vector<grpc::Status> status(5);
  std::vector<std::thread> threads;
  const v1::GenerateRequest big = BigGenerate();
  for (int i = 0; i < 5; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      status[i] = Drain(stub_->Generate(&ctx, big)).status;
    });
  }
  for (auto& t : threads) t.join();
  int exhausted = 0, tokenized = 0;
  for (const grpc::Status& st : status) {
    if (st.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
      EXPECT_THAT(st.error_message(), HasSubstr("pool is full"));
    } else {
      ExpectNamed(st, "prompt has", "big prompt");
      ++tokenized;
    }
  }
  EXPECT_GE(exhausted, 1);
  EXPECT_GE(tokenized, 2);  // the running one and the waiting one
  // Tokenize goes through the same pool.
  {
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text("Once upon a time");
    v1::TokenizeResponse resp;
    EXPECT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
    EXPECT_GT(resp.token_ids_size(), 0);
  }
  EXPECT_TRUE(Small().status.ok());
  ExpectNoLeak();
}

// Cancelling calls that wait in the pool or are being tokenized: each ends CANCELLED,
// nothing leaks, the server serves on and then stops cleanly (its shutdown waits for
// the pool's work).
TEST_F(PoolTest, CancelWhileQueuedOrTokenizing) {
  Start(8);
  const v1::GenerateRequest big = BigGenerate();
  v1::TokenizeRequest tok;
  tok.set_text(big.text());
  constexpr int kCalls = 4;
  std::vector<std::unique_ptr<grpc::ClientContext>> ctxs;
  for (int i = 0; i < kCalls; ++i) ctxs.push_back(std::make_unique<grpc::ClientContext>());
  std::vector<grpc::Status> status(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      if (i % 2 == 0) {
        status[i] = Drain(stub_->Generate(ctxs[i].get(), big)).status;
      } else {
        v1::TokenizeResponse resp;
        status[i] = stub_->Tokenize(ctxs[i].get(), tok, &resp);
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (auto& c : ctxs) c->TryCancel();
  for (auto& t : threads) t.join();
  for (const grpc::Status& st : status) {
    EXPECT_EQ(st.error_code(), grpc::StatusCode::CANCELLED) << st.error_message();
  }
  EXPECT_TRUE(Small().status.ok());
  ExpectNoLeak();
  // Large work still queued when the server stops: it exits cleanly.
  std::vector<std::thread> late;
  for (int i = 0; i < 3; ++i) {
    late.emplace_back([&] {
      grpc::ClientContext ctx;
      Drain(stub_->Generate(&ctx, big));
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(server_->Stop(), 0);
  for (auto& t : late) t.join();
}

// The server stops (SIGTERM) with a short grace period while large requests wait in
// the pool and one is being tokenized: it exits cleanly, every call gets a status.
TEST_F(PoolTest, StopWhileTokenizing) {
  Start(8, {"--shutdown_grace_s=0.05"});
  const v1::GenerateRequest big = BigGenerate();
  std::vector<grpc::Status> status(4);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      status[i] = Drain(stub_->Generate(&ctx, big)).status;
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(server_->Stop(), 0);
  for (auto& t : threads) t.join();
  for (const grpc::Status& st : status) EXPECT_FALSE(st.ok());
}

// Bad bound flags stop startup.
TEST(BoundsFlagsTest, BadValuesFailStartup) {
  for (const char* flag : {"--tokenize_threads=0", "--tokenize_queue=-1", "--max_bytes_per_token=0",
                           "--max_text_bytes=-5", "--max_request_bytes=4000000000"}) {
    testing::ServerProcess server({"--model=" + testing::Stories260kDir(), flag});
    EXPECT_FALSE(server.ok()) << flag;
  }
}

}  // namespace
}  // namespace superpose
