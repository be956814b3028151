// GenerateRag end to end: a real superpose-server on loopback, real gRPC clients, the
// real stories260k model.
#include <gtest/gtest.h>

#include <httplib.h>

#include <cmath>
#include <fstream>
#include <sstream>
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

class RagServerTest : public testing::SharedServerTest<RagServerTest> {
 public:
  static std::vector<std::string> ServerArgs() {
    return {"--model=" + testing::Stories260kDir(), "--rag_max_documents=6"};
  }

 protected:
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Superpose::NewStub(server_->Channel());
  }

  struct Streamed {
    std::vector<uint32_t> ids;
    std::string text;
    v1::GenerateResponse last;
    grpc::Status status;
  };
  template <typename Req, typename Call>
  Streamed Run(const Req& req, Call call) {
    Streamed s;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = call(&ctx, req);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      s.ids.insert(s.ids.end(), r.token_ids().begin(), r.token_ids().end());
      s.text += r.text();
      s.last = r;
    }
    s.status = reader->Finish();
    return s;
  }
  Streamed Rag(const v1::GenerateRagRequest& req) {
    return Run(req, [&](grpc::ClientContext* c, const v1::GenerateRagRequest& r) {
      return stub_->GenerateRag(c, r);
    });
  }
  Streamed Generate(const v1::GenerateRequest& req) {
    return Run(req, [&](grpc::ClientContext* c, const v1::GenerateRequest& r) {
      return stub_->Generate(c, r);
    });
  }
  std::vector<uint32_t> Tokenize(const std::string& text, bool special) {
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text(text);
    req.set_add_special_tokens(special);
    v1::TokenizeResponse resp;
    EXPECT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
    return {resp.token_ids().begin(), resp.token_ids().end()};
  }

  static v1::GenerateRagRequest Request(int docs) {
    v1::GenerateRagRequest req;
    req.set_preamble("Read the stories and answer the question.");
    const char* texts[] = {
        "Lily went to the park with her mom. She saw a big red ball.",
        "Tom had a little dog named Max. Max liked to run and jump in the garden.",
        "The sun was shining and the birds were singing.",
        "Once upon a time there was a cat who loved fish.",
        "Sam found a shiny stone by the river and gave it to his sister.",
        "Mia baked a cake with her dad and it was yummy."};
    for (int i = 0; i < docs; ++i) {
      v1::RagDocument* d = req.add_documents();
      d->set_text(texts[i % 6]);
      d->set_id("doc-" + std::to_string(i));
    }
    req.set_query("What did Lily see at the park?");
    req.set_postamble(" Answer:");
    req.mutable_sampling()->set_temperature(0.0f);
    req.mutable_sampling()->set_max_new_tokens(8);
    req.set_ignore_eos(true);
    return req;
  }

  std::unique_ptr<v1::Superpose::Stub> stub_;
};

TEST_F(RagServerTest, SuperpositionReportsScoresAndKeepsTopK) {
  v1::GenerateRagRequest req = Request(5);
  req.mutable_rag()->set_top_k(2);
  req.mutable_rag()->set_path_cache(false);
  const Streamed s = Rag(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.ids.size(), 8u);
  ASSERT_TRUE(s.last.has_rag());
  const v1::RagReport& r = s.last.rag();
  EXPECT_EQ(r.mode(), v1::RAG_MODE_SUPERPOSITION);
  ASSERT_EQ(r.documents_size(), 5);
  std::vector<double> scores;
  int kept = 0;
  for (const auto& d : r.documents()) {
    EXPECT_TRUE(std::isfinite(d.score()));
    EXPECT_LT(d.score(), 0.0);
    EXPECT_FALSE(d.cached());
    EXPECT_EQ(d.id(), "doc-" + std::to_string(d.index()));
    scores.push_back(d.score());
    kept += d.kept();
  }
  EXPECT_EQ(kept, 2);
  // Exactly the two highest scores are kept.
  std::vector<double> sorted = scores;
  std::sort(sorted.rbegin(), sorted.rend());
  for (const auto& d : r.documents()) EXPECT_EQ(d.kept(), d.score() >= sorted[1]) << d.index();
  EXPECT_GT(r.pruned_tokens(), 0u);
  EXPECT_GT(r.flops(), 0);
  EXPECT_LT(r.critical_path_flops(), r.flops());
  EXPECT_GT(r.naive_flops(), 0);
  EXPECT_GT(r.span(), 0);
  EXPECT_GT(s.last.usage().prompt_tokens(), 0u);
}

TEST_F(RagServerTest, NaiveModeEqualsGenerateOnTheConcatenatedPrompt) {
  v1::GenerateRagRequest req = Request(4);
  req.mutable_rag()->set_mode(v1::RAG_MODE_NAIVE);
  const Streamed naive = Rag(req);
  ASSERT_TRUE(naive.status.ok()) << naive.status.error_message();
  // The same segments tokenized one by one (BOS on the preamble only; each document
  // ends with a newline), concatenated.
  std::vector<uint32_t> ids = Tokenize(req.preamble(), true);
  for (const auto& d : req.documents()) {
    for (uint32_t t : Tokenize(d.text() + "\n", false)) ids.push_back(t);
  }
  for (uint32_t t : Tokenize(req.query(), false)) ids.push_back(t);
  for (uint32_t t : Tokenize(req.postamble(), false)) ids.push_back(t);
  v1::GenerateRequest g;
  for (uint32_t t : ids) g.mutable_token_ids()->add_ids(t);
  *g.mutable_sampling() = req.sampling();
  g.set_ignore_eos(true);
  const Streamed flat = Generate(g);
  ASSERT_TRUE(flat.status.ok());
  EXPECT_EQ(naive.ids, flat.ids);
  EXPECT_EQ(naive.text, flat.text);
  EXPECT_EQ(naive.last.rag().mode(), v1::RAG_MODE_NAIVE);
  EXPECT_EQ(naive.last.usage().prompt_tokens(), ids.size());
}

TEST_F(RagServerTest, PathCacheHitOverGrpcAndMetrics) {
  const int mport = server_->metrics_port();
  ASSERT_GT(mport, 0);
  const double hits_before = testing::MetricValue(mport, "superpose_rag_path_cache_hits_total");
  v1::GenerateRagRequest req = Request(3);
  req.set_preamble("A different preamble for the cache test.");
  const Streamed cold = Rag(req);
  const Streamed warm = Rag(req);
  ASSERT_TRUE(cold.status.ok() && warm.status.ok());
  EXPECT_EQ(cold.ids, warm.ids);
  uint64_t doc_tokens = 0;
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(cold.last.rag().documents(i).cached());
    EXPECT_TRUE(warm.last.rag().documents(i).cached());
    EXPECT_NEAR(cold.last.rag().documents(i).score(), warm.last.rag().documents(i).score(), 1e-5);
    doc_tokens += warm.last.rag().documents(i).tokens();
  }
  EXPECT_EQ(warm.last.rag().path_cache_tokens(), doc_tokens);
  EXPECT_LT(warm.last.rag().computed_tokens(), cold.last.rag().computed_tokens());
  EXPECT_EQ(testing::MetricValue(mport, "superpose_rag_path_cache_hits_total"), hits_before + 3);
  EXPECT_GT(testing::MetricValue(mport, "superpose_rag_flops_total"), 0);
  EXPECT_GT(testing::MetricValue(mport, "superpose_rag_naive_flops_total"), 0);
  double used = -1;
  for (int i = 0; i < 100 && used != 0; ++i) {
    used = testing::MetricValue(mport, "superpose_kv_blocks_used");
    if (used != 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(used, 0);
}

TEST_F(RagServerTest, BadInputIsInvalidArgumentNamingTheField) {
  struct Case {
    std::string name;
    std::function<void(v1::GenerateRagRequest*)> mutate;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"no documents", [](auto* r) { r->clear_documents(); }, "documents"},
      {"too many documents",
       [](auto* r) {
         for (int i = 0; i < 4; ++i) r->add_documents()->set_text("More text.");
       },
       "documents"},
      {"document longer than the context",
       [](auto* r) {
         std::string big;
         for (int i = 0; i < 400; ++i) big += "the cat sat. ";
         r->mutable_documents(1)->set_text(big);
       },
       "documents[1].text"},
      {"empty document", [](auto* r) { r->mutable_documents(2)->clear_text(); },
       "documents[2].text"},
      {"k < 1", [](auto* r) { r->mutable_rag()->set_top_k(0); }, "rag.top_k"},
      {"k > documents", [](auto* r) { r->mutable_rag()->set_top_k(4); }, "rag.top_k"},
      {"no query", [](auto* r) { r->clear_query(); }, "query"},
      {"doc weight NaN", [](auto* r) { r->mutable_rag()->set_doc_weight(NAN); }, "rag.doc_weight"},
      {"bad span", [](auto* r) { r->mutable_rag()->set_canonical_span(-1); }, "rag.canonical_span"},
      {"bad utf-8", [](auto* r) { r->mutable_documents(0)->set_text("ok \xff"); },
       "documents[0].text"},
      {"request_id carrying text", [](auto* r) { r->set_request_id("patient John Doe has"); },
       "request_id"},
      {"bad sampling", [](auto* r) { r->mutable_sampling()->set_top_p(2); }, "sampling.top_p"},
  };
  for (const Case& c : cases) {
    v1::GenerateRagRequest req = Request(3);
    c.mutate(&req);
    const Streamed s = Rag(req);
    EXPECT_EQ(s.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.name;
    EXPECT_NE(s.status.error_message().find(c.field), std::string::npos)
        << c.name << ": " << s.status.error_message();
  }
  // The server keeps serving.
  EXPECT_TRUE(Rag(Request(2)).status.ok());
}

std::string MetricsText(int port) {
  httplib::Client cli("127.0.0.1", port);
  auto res = cli.Get("/metrics");
  return res ? res->body : std::string();
}

// The request-bounds error paths, each carrying the secrets of `rag` (and more) in
// every text field it has; appends their error messages.
void BoundsErrorPaths(const testing::ServerProcess& server, const v1::GenerateRagRequest& rag,
                      std::vector<std::string>* errors) {
  auto channel = server.Channel();
  auto stub = v1::Superpose::NewStub(channel);
  auto finish = [&](auto reader) {
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
    }
    const grpc::Status st = reader->Finish();
    EXPECT_FALSE(st.ok());
    errors->push_back(st.error_message());
  };
  auto unknown = [](google::protobuf::Message* m) {
    return m->GetReflection()->MutableUnknownFields(m);
  };
  std::string big;  // over --max_text_bytes (512 * 32)
  while (big.size() <= 512 * 32) big += "Snorkelwizard met Zebracorn. ";
  {  // oversized fields: text, stop, preamble, document, Tokenize
    v1::GenerateRequest gen;
    gen.set_text(big);
    gen.add_stop("Snorkelwizard");
    grpc::ClientContext ctx;
    finish(stub->Generate(&ctx, gen));
    v1::GenerateRagRequest r = rag;
    r.set_preamble(big);
    grpc::ClientContext ctx2;
    finish(stub->GenerateRag(&ctx2, r));
    r = rag;
    r.mutable_documents(1)->set_text(big);
    grpc::ClientContext ctx3;
    finish(stub->GenerateRag(&ctx3, r));
    grpc::ClientContext ctx4;
    v1::TokenizeRequest tok;
    tok.set_text(big);
    v1::TokenizeResponse resp;
    errors->push_back(stub->Tokenize(&ctx4, tok, &resp).error_message());
  }
  {  // pooled tokenizing (over 4 KiB of text), then refused by the context window
    v1::GenerateRequest gen;
    gen.set_text(big.substr(0, 512 * 32 - 1));
    grpc::ClientContext ctx;
    finish(stub->Generate(&ctx, gen));
  }
  {  // a pooled request cancelled at once
    v1::GenerateRequest gen;
    gen.set_text(big.substr(0, 512 * 32 - 1));
    grpc::ClientContext ctx;
    auto reader = stub->Generate(&ctx, gen);
    ctx.TryCancel();
    finish(std::move(reader));
  }
  {  // unknown enum value; an unknown field and a wrong wire type carrying a secret
    v1::GenerateRagRequest r = rag;
    unknown(r.mutable_rag())->AddVarint(1, 99);
    grpc::ClientContext ctx;
    finish(stub->GenerateRag(&ctx, r));
    r = rag;
    unknown(r.mutable_documents(0))->AddLengthDelimited(42, "Quokkaville");
    grpc::ClientContext ctx2;
    finish(stub->GenerateRag(&ctx2, r));
    r = rag;
    unknown(r.mutable_sampling())->AddLengthDelimited(2, "Marzipantown");
    grpc::ClientContext ctx3;
    finish(stub->GenerateRag(&ctx3, r));
  }
  {  // malformed: a truncated request, cut inside its query
    const std::string wire = rag.SerializeAsString();
    const size_t cut = wire.find("Marzipantown") + 4;
    errors->push_back(
        testing::RawCall(channel, "GenerateRag", wire.substr(0, cut)).error_message());
    v1::TokenizeRequest tok;
    tok.set_text("Xylophonia");
    const std::string t = tok.SerializeAsString();
    errors->push_back(
        testing::RawCall(channel, "Tokenize", t.substr(0, t.size() - 2)).error_message());
  }
}

// Privacy, end to end: with every log level on, the server's log (stdout and stderr)
// carries the request ids, sizes and timings of a Generate, a GenerateRag, a cancelled
// Generate and GenerateRag (the RAG group's own finish line) and a rejected request, and
// never their prompt, document, query or generated text. Neither do the error messages
// and the metrics of the bounds paths: oversized fields, malformed payloads, unknown
// enum values and fields, pooled tokenizing that is refused or cancelled.
TEST(ServerLogPrivacyTest, LogsIdsAndSizesNeverText) {
  const std::string log = "/tmp/superpose-test-log-" + std::to_string(getpid());
  const std::vector<std::string> secrets = {"Zebracorn",    "Quokkaville",   "Xylophonia",
                                            "Marzipantown", "Snorkelwizard", "Preamblesque"};
  std::vector<std::string> outputs;
  std::vector<std::string> errors;  // the error messages of the bounds paths
  std::string metrics;
  {
    testing::ServerProcess server({"--model=" + testing::Stories260kDir(), "--log_level=trace"},
                                  log);
    ASSERT_TRUE(server.ok());
    {
      auto stub = v1::Superpose::NewStub(server.Channel());
      auto drain = [&](auto reader) {
        v1::GenerateResponse r;
        std::string text;
        while (reader->Read(&r)) text += r.text();
        outputs.push_back(text);
        return reader->Finish();
      };
      v1::GenerateRequest gen;
      gen.set_request_id("priv-gen-1");
      gen.set_text("Zebracorn and Quokkaville went to the park one day.");
      gen.mutable_sampling()->set_temperature(0.0f);
      gen.mutable_sampling()->set_max_new_tokens(24);
      gen.set_ignore_eos(true);
      {
        grpc::ClientContext ctx;
        EXPECT_TRUE(drain(stub->Generate(&ctx, gen)).ok());
      }
      v1::GenerateRagRequest rag;
      rag.set_request_id("priv-rag-1");
      rag.set_preamble("Preamblesque: read the stories.");
      rag.add_documents()->set_text("Xylophonia is a little town with a big red ball.");
      rag.add_documents()->set_text("Tom had a dog in Zebracorn.");
      rag.set_query("Where is Marzipantown?");
      rag.set_postamble(" Answer:");
      rag.mutable_sampling()->set_temperature(0.0f);
      rag.mutable_sampling()->set_max_new_tokens(16);
      rag.set_ignore_eos(true);
      {
        grpc::ClientContext ctx;
        EXPECT_TRUE(drain(stub->GenerateRag(&ctx, rag)).ok());
      }
      {  // cancelled after its first response
        gen.set_request_id("priv-cancel-1");
        gen.mutable_sampling()->set_max_new_tokens(400);
        grpc::ClientContext ctx;
        auto reader = stub->Generate(&ctx, gen);
        v1::GenerateResponse r;
        reader->Read(&r);
        ctx.TryCancel();
        while (reader->Read(&r)) {
        }
        reader->Finish();
      }
      {  // a RAG request cancelled in its answer (the group's own finish line)
        rag.set_request_id("priv-rag-cancel-1");
        rag.mutable_sampling()->set_max_new_tokens(400);
        grpc::ClientContext ctx;
        auto reader = stub->GenerateRag(&ctx, rag);
        v1::GenerateResponse r;
        reader->Read(&r);
        ctx.TryCancel();
        while (reader->Read(&r)) {
        }
        reader->Finish();
      }
      {  // rejected: bad sampling, text in the prompt and a stop string
        v1::GenerateRequest bad;
        bad.set_text("Snorkelwizard");
        bad.add_stop("Snorkelwizard");
        bad.mutable_sampling()->set_top_p(7.0f);
        grpc::ClientContext ctx;
        EXPECT_EQ(drain(stub->Generate(&ctx, bad)).error_code(),
                  grpc::StatusCode::INVALID_ARGUMENT);
      }
      BoundsErrorPaths(server, rag, &errors);
      metrics = MetricsText(server.metrics_port());
    }
    EXPECT_EQ(server.Stop(), 0);
  }
  // Authentication, tenant limits and shutdown with a stream running: a server with keys.
  const std::string keys = log + "-keys";
  std::ofstream(keys) << "priv-key-a tenant-a\npriv-key-b tenant-b max_prompt_tokens=4\n";
  const std::string log2 = log + "-tenants";
  {
    testing::ServerProcess server({"--model=" + testing::Stories260kDir(), "--log_level=trace",
                                   "--api_keys_file=" + keys, "--shutdown_grace_s=0"},
                                  log2);
    ASSERT_TRUE(server.ok());
    auto stub = v1::Superpose::NewStub(server.Channel());
    v1::GenerateRequest gen;
    gen.set_text("Zebracorn and Quokkaville went to the park one day.");
    gen.mutable_sampling()->set_max_new_tokens(400);
    gen.set_ignore_eos(true);
    auto run = [&](const std::string& key) {
      grpc::ClientContext ctx;
      ctx.AddMetadata("authorization", "Bearer " + key);
      auto reader = stub->Generate(&ctx, gen);
      v1::GenerateResponse r;
      while (reader->Read(&r)) {
      }
      const grpc::Status st = reader->Finish();
      errors.push_back(st.error_message());
      return st.error_code();
    };
    EXPECT_EQ(run("Snorkelwizard"), grpc::StatusCode::UNAUTHENTICATED);
    EXPECT_EQ(run("priv-key-b"), grpc::StatusCode::RESOURCE_EXHAUSTED);  // max_prompt_tokens
    // Running when SIGTERM comes, cut at the end of the grace.
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer priv-key-a");
    auto reader = stub->Generate(&ctx, gen);
    v1::GenerateResponse r, last;
    ASSERT_TRUE(reader->Read(&r));
    std::thread drain([&] {
      while (reader->Read(&r)) last = r;
    });
    EXPECT_EQ(server.Stop(), 0);
    drain.join();
    const grpc::Status st = reader->Finish();
    errors.push_back(st.error_message());
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_CANCELLED);
  }
  std::remove(keys.c_str());
  std::string text;
  for (const std::string& path : {log, log2}) {
    std::ifstream in(path);
    std::stringstream all;
    all << in.rdbuf();
    text += all.str();
    std::remove(path.c_str());
  }
  // The log is there and carries the requests...
  EXPECT_NE(text.find("req=priv-gen-1"), std::string::npos) << text;
  EXPECT_NE(text.find("req=priv-rag-1"), std::string::npos) << text;
  EXPECT_NE(text.find("req=priv-rag-cancel-1 handle="), std::string::npos) << text;
  EXPECT_NE(text.find("rag finish=cancelled"), std::string::npos) << text;
  EXPECT_NE(text.find("req=priv-cancel-1"), std::string::npos) << text;
  EXPECT_NE(text.find("rejected: INVALID_ARGUMENT"), std::string::npos) << text;
  // ...and none of their text.
  for (const std::string& s : secrets) EXPECT_EQ(text.find(s), std::string::npos) << s;
  std::string all_errors;
  for (const std::string& e : errors) all_errors += e + "\n";
  for (const char* want :
       {"text has", "preamble has", "documents[1].text has", "prompt has", "CANCELLED",
        "rag.mode: unknown value 99", "unknown field (number 42, in documents[0])",
        "sampling.temperature has the wrong wire type",
        "not a valid superpose.v1.GenerateRagRequest", "not a valid superpose.v1.TokenizeRequest",
        "unknown API key", "max_prompt_tokens"}) {
    EXPECT_NE(all_errors.find(want), std::string::npos) << want << " in " << all_errors;
  }
  for (const std::string& s : secrets) {
    EXPECT_EQ(metrics.find(s), std::string::npos) << s;
    for (const std::string& e : errors) EXPECT_EQ(e.find(s), std::string::npos) << s << ": " << e;
  }
  for (const std::string& o : outputs) {
    if (o.size() >= 12) {
      EXPECT_EQ(text.find(o), std::string::npos) << "generated text: " << o;
    }
  }
}

}  // namespace
}  // namespace superpose
