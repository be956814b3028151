// The HTTP API's JSON parsing and the chat layout rule, without a server
// (server/openai_protocol.h, server/chat_prompt.h).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "server/chat_prompt.h"
#include "server/openai_protocol.h"

namespace superpose::server {
namespace {

using nlohmann::json;
using openai::Endpoint;
using ::testing::HasSubstr;

class ParseTest : public ::testing::Test {
 protected:
  ParseTest() : chat_(ChatPrompter::Without("no template here")) {
    limits_.context_length = 512;
    limits_.vocab_size = 512;
    ctx_ = {"m", &chat_, &limits_, nullptr};
  }
  absl::StatusOr<openai::CallPlan> Parse(const std::string& body,
                                         Endpoint e = Endpoint::kCompletions) {
    return openai::ParseCall(json::parse(body), e, ctx_);
  }
  std::string ParamOfError(const std::string& body, Endpoint e = Endpoint::kCompletions) {
    absl::StatusOr<openai::CallPlan> p = Parse(body, e);
    EXPECT_FALSE(p.ok()) << body;
    return p.ok() ? "<ok>" : openai::ParamOf(p.status());
  }
  Limits limits_;
  ChatPrompter chat_;
  openai::ParseContext ctx_;
};

TEST_F(ParseTest, CompletionFieldsMapToGenerateRequest) {
  absl::StatusOr<openai::CallPlan> p = Parse(R"({"model": "m", "prompt": "Hi", "max_tokens": 7,
      "temperature": 0.5, "top_p": 0.9, "top_k": 3, "min_p": 0.1, "presence_penalty": 1,
      "frequency_penalty": -1, "repetition_penalty": 1.2, "seed": 9, "stop": "x", "n": 2,
      "logprobs": 3, "stream": true, "stream_options": {"include_usage": true}, "user": "u",
      "ignore_eos": true, "priority": 5})");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->prompts.size(), 1u);
  const v1::GenerateRequest& r = p->prompts[0];
  EXPECT_EQ(r.text(), "Hi");
  EXPECT_EQ(r.sampling().max_new_tokens(), 7u);
  EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().top_k(), 3u);
  EXPECT_FLOAT_EQ(r.sampling().min_p(), 0.1f);
  EXPECT_FLOAT_EQ(r.sampling().presence_penalty(), 1.0f);
  EXPECT_FLOAT_EQ(r.sampling().frequency_penalty(), -1.0f);
  EXPECT_FLOAT_EQ(r.sampling().repetition_penalty(), 1.2f);
  EXPECT_EQ(r.sampling().seed(), 9u);
  ASSERT_EQ(r.stop_size(), 1);
  EXPECT_EQ(r.stop(0), "x");
  EXPECT_TRUE(r.logprobs());
  EXPECT_EQ(r.top_logprobs(), 3u);
  EXPECT_TRUE(r.ignore_eos());
  EXPECT_EQ(r.priority(), 5);
  EXPECT_EQ(p->n, 2);
  EXPECT_EQ(p->num_choices(), 2);
  EXPECT_TRUE(p->stream);
  EXPECT_TRUE(p->include_usage);
}

TEST_F(ParseTest, PromptForms) {
  auto p = Parse(R"({"model": "m", "prompt": [1, 2, 3]})");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->prompts[0].token_ids().ids_size(), 3);
  p = Parse(R"({"model": "m", "prompt": ["a", "b"], "n": 3})");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->prompts.size(), 2u);
  EXPECT_EQ(p->num_choices(), 6);
  p = Parse(R"({"model": "m", "prompt": [[1], [2, 3]]})");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->prompts[1].token_ids().ids_size(), 2);
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": ["a", "b"], "n": 9})"), "n");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": []})"), "prompt");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": [1.5]})"), "prompt");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": [["a"]]})"), "prompt");
}

TEST_F(ParseTest, NullIsAbsentAndWrongTypesNameTheField) {
  auto p = Parse(R"({"model": "m", "prompt": "Hi", "temperature": null, "stop": null})");
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE(p->prompts[0].sampling().has_temperature());
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": "Hi", "seed": 1.5})"), "seed");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": "Hi", "stop": [1]})"), "stop");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": "Hi", "best_of": 2})"), "best_of");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": "Hi", "response_format":
      {"type": "json_object"}})"),
            "response_format");
  EXPECT_EQ(ParamOfError(R"({"model": "m", "prompt": "Hi", "priority": 101})"), "priority");
  absl::StatusOr<openai::CallPlan> wrong = Parse(R"({"model": "other", "prompt": "Hi"})");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(openai::ToApiError(wrong.status()).http_status, 404);
}

TEST_F(ParseTest, ChatFormsAndTheMissingTemplate) {
  EXPECT_EQ(ParamOfError(R"({"model": "m", "messages": [{"role": "user", "content": "x"}]})",
                         Endpoint::kChat),
            "messages");
  absl::StatusOr<openai::CallPlan> p =
      Parse(R"({"model": "m", "messages": [{"role": "user", "content": "x"}]})", Endpoint::kChat);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("no template here"));
  EXPECT_EQ(ParamOfError(R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "logprobs": 2})",
                         Endpoint::kChat),
            "logprobs");  // a boolean in the chat form
}

TEST(ParamOfTest, GrpcSideMessagesMapToOpenAiNames) {
  EXPECT_EQ(openai::ParamOf(absl::InvalidArgumentError("sampling.max_new_tokens = 9 does not fit")),
            "max_tokens");
  EXPECT_EQ(openai::ParamOf(absl::InvalidArgumentError("sampling.top_p must be in (0, 1]")),
            "top_p");
  EXPECT_EQ(openai::ParamOf(absl::InvalidArgumentError("stop[0] is empty")), "stop");
  EXPECT_EQ(openai::ParamOf(absl::InvalidArgumentError("text has 20000 bytes")), "prompt");
  EXPECT_EQ(openai::ParamOf(absl::InvalidArgumentError("prompt has 600 tokens")), "prompt");
  EXPECT_EQ(openai::ParamOf(absl::ResourceExhaustedError("queue full")), "");
  const openai::ApiError e =
      openai::ToApiError(absl::InvalidArgumentError("sampling.max_new_tokens = 9 does not fit"));
  EXPECT_EQ(e.http_status, 400);
  EXPECT_EQ(e.body["error"]["message"], "max_tokens = 9 does not fit");
  EXPECT_EQ(openai::ToApiError(absl::ResourceExhaustedError("x")).http_status, 429);
  EXPECT_EQ(openai::ToApiError(absl::UnavailableError("x")).http_status, 503);
  EXPECT_EQ(openai::ToApiError(absl::UnauthenticatedError("x")).http_status, 401);
}

TEST(ChatLayoutTest, CutAtMarkers) {
  absl::StatusOr<ChatRagParts> p = CutAtMarkers("<s>sys|user:[Q]|end", "[", "]");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->preamble, "<s>sys|user:");
  EXPECT_EQ(p->query, "Q");
  EXPECT_EQ(p->postamble, "|end");
  EXPECT_FALSE(CutAtMarkers("no markers", "[", "]").ok());
  EXPECT_FALSE(CutAtMarkers("[a][b]", "[", "]").ok());  // twice: ambiguous
  EXPECT_FALSE(CutAtMarkers("]a[", "[", "]").ok());     // out of order
}

TEST(ChatLayoutTest, NormalizeMessages) {
  absl::StatusOr<json> m = NormalizeMessages(json::parse(
      R"([{"role": "user", "content": [{"type": "text", "text": "a"},
                                        {"type": "text", "text": "b"}]},
          {"role": "assistant", "content": null}])"));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)[0]["content"], "ab");
  EXPECT_EQ((*m)[1]["content"], "");
  EXPECT_THAT(std::string(NormalizeMessages(json::parse(R"([{"role": "user", "content":
      [{"type": "image_url", "image_url": {}}]}])"))
                              .status()
                              .message()),
              HasSubstr("messages[0].content[0]"));
  EXPECT_FALSE(NormalizeMessages(json::parse("[]")).ok());
  EXPECT_FALSE(NormalizeMessages(json::parse(R"([{"role": 1, "content": "x"}])")).ok());
}

// A refused option object names its field, not the caller's value: protobuf's JSON parser
// quotes the value it could not read, and that value can be anything (found by fuzzing: an
// enum value with control bytes came back in the error body).
TEST_F(ParseTest, OptionObjectErrorsDoNotEchoTheValue) {
  const char* bodies[] = {
      R"({"model": "m", "prompt": "Hi", "lazy": {"keep": "secret\u007f words"}})",
      R"({"model": "m", "prompt": "Hi", "lazy": {"secret\u007f words": 1}})",
  };
  for (const char* body : bodies) {
    absl::StatusOr<openai::CallPlan> p = Parse(body);
    ASSERT_FALSE(p.ok()) << body;
    const std::string message(p.status().message());
    EXPECT_EQ(openai::ParamOf(p.status()), "lazy") << message;
    EXPECT_THAT(message, ::testing::Not(HasSubstr("secret"))) << message;
    for (char c : message) EXPECT_TRUE(c >= 0x20 && c <= 0x7E) << message;
  }
  absl::StatusOr<openai::CallPlan> p =
      Parse(R"({"model": "m", "prompt": "Hi", "lazy": {"keep_fractions": "secret"}})");
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("lazy.keep_fractions"));
  p = Parse(R"({"model": "m", "prompt": "Hi", "lazy": {"kep": 1}})");
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("unknown field (known: "));
}

}  // namespace
}  // namespace superpose::server
