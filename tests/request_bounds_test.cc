// Unit tests of the request-bounds pieces: the bounded WorkPool, strict request parsing
// (server/wire.h) and the derived limits (server/request_bounds.h). The end-to-end
// tests over gRPC are in server_bounds_test.cc.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>

#include <google/protobuf/unknown_field_set.h>

#include "absl/synchronization/notification.h"
#include "server/request_bounds.h"
#include "server/wire.h"
#include "server/work_pool.h"

namespace superpose::server {
namespace {

using ::testing::HasSubstr;

TEST(WorkPoolTest, BoundsTheWaitingTasksAndRunsEachQueuedOneOnce) {
  std::atomic<int> ran{0};
  absl::Notification started, release;
  {
    WorkPool pool(1, 2);
    ASSERT_TRUE(pool.TrySubmit([&] {
                      started.Notify();
                      release.WaitForNotification();
                      ran.fetch_add(1);
                    })
                    .ok());
    started.WaitForNotification();  // the one worker is busy
    EXPECT_TRUE(pool.TrySubmit([&] { ran.fetch_add(1); }).ok());
    EXPECT_TRUE(pool.TrySubmit([&] { ran.fetch_add(1); }).ok());
    const absl::Status full = pool.TrySubmit([&] { ran.fetch_add(100); });
    EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
    EXPECT_THAT(std::string(full.message()), HasSubstr("pool is full"));
    release.Notify();
    pool.Stop();  // runs what is queued
    EXPECT_EQ(ran.load(), 3);
    EXPECT_EQ(pool.TrySubmit([] {}).code(), absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(ran.load(), 3);
}

TEST(WireTest, UnknownEnumValuesFieldsAndWireTypesNameTheField) {
  v1::GenerateRagRequest req;
  req.set_query("q");
  req.add_documents()->set_text("d");
  req.mutable_rag()->GetReflection()->MutableUnknownFields(req.mutable_rag())->AddVarint(1, -3);
  v1::GenerateRagRequest parsed;
  grpc::ByteBuffer bytes = Serialize(req);
  absl::Status st = ParseRequest(bytes, &parsed);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "rag.mode: unknown value -3 of RagMode");

  v1::TokenizeRequest tok;
  tok.GetReflection()->MutableUnknownFields(&tok)->AddFixed32(2, 1);  // a bool as fixed32
  v1::TokenizeRequest tok_parsed;
  st = ParseRequest(Serialize(tok), &tok_parsed);
  EXPECT_EQ(st.message(), "add_special_tokens has the wrong wire type");

  v1::GenerateRequest ok;
  ok.set_text("fine");
  ok.mutable_sampling()->set_max_new_tokens(0);
  v1::GenerateRequest ok_parsed;
  EXPECT_TRUE(ParseRequest(Serialize(ok), &ok_parsed).ok());
  EXPECT_EQ(ok_parsed.text(), "fine");
  EXPECT_TRUE(ok_parsed.sampling().has_max_new_tokens());
}

TEST(WireTest, MalformedBytesNameTheType) {
  const std::string bytes = "\x0a\x10short";  // a length beyond the end
  grpc::Slice slice(bytes);
  grpc::ByteBuffer buffer(&slice, 1);
  v1::DetokenizeRequest req;
  const absl::Status st = ParseRequest(buffer, &req);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("not a valid superpose.v1.DetokenizeRequest"));
}

TEST(RequestBoundsTest, DerivedFromTheContextWindow) {
  absl::StatusOr<RequestBounds> b = DeriveRequestBounds(512, BoundsConfig{});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->max_text_bytes, 512 * 32);
  EXPECT_EQ(b->max_request_bytes, 4 * 512 * 32 + 65536);
  BoundsConfig c;
  c.max_bytes_per_token = 8;
  b = DeriveRequestBounds(131072, c);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->max_text_bytes, 131072 * 8);
  c.max_text_bytes = 1000;
  c.max_request_bytes = 5000;
  b = DeriveRequestBounds(131072, c);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->max_text_bytes, 1000);
  EXPECT_EQ(b->max_request_bytes, 5000);
  // A derived message limit past gRPC's int is capped; a given one is an error.
  c = BoundsConfig{};
  c.max_text_bytes = int64_t{1} << 30;
  b = DeriveRequestBounds(512, c);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->max_request_bytes, INT_MAX);
  c.max_request_bytes = int64_t{1} << 32;
  EXPECT_FALSE(DeriveRequestBounds(512, c).ok());
  c = BoundsConfig{};
  c.max_bytes_per_token = 0;
  EXPECT_THAT(std::string(DeriveRequestBounds(512, c).status().message()),
              HasSubstr("--max_bytes_per_token"));
}

TEST(RequestBoundsTest, RagPathsAreBoundedBeforeTokenizing) {
  Limits limits;
  limits.context_length = 512;
  limits.vocab_size = 512;
  limits.max_text_bytes = 100;
  v1::GenerateRagRequest req;
  req.set_preamble(std::string(40, 'p'));
  req.set_query(std::string(10, 'q'));
  req.add_documents()->set_text(std::string(50, 'a'));
  req.add_documents()->set_text(std::string(50, 'b'));
  EXPECT_TRUE(CheckBounds(req, limits).ok());       // each path: 100 bytes
  req.mutable_rag()->set_mode(v1::RAG_MODE_NAIVE);  // all together: 150
  EXPECT_THAT(std::string(CheckBounds(req, limits).message()),
              HasSubstr("documents (rag.mode = NAIVE"));
  req.mutable_rag()->clear_mode();
  req.mutable_documents(1)->set_text(std::string(51, 'b'));
  EXPECT_THAT(std::string(CheckBounds(req, limits).message()),
              HasSubstr("documents[1].text with the preamble, query and postamble has 101 bytes"));
}

}  // namespace
}  // namespace superpose::server
