// libFuzzer target: the OpenAI-compatible HTTP API's request parsing
// (server/openai_protocol.h ParseCall) with the real stories260k tokenizer and a ChatML
// chat template, then the same conversion the server runs before the engine sees a
// request (server/convert.h). Byte 0 picks the endpoint (completions or chat); the rest
// is the JSON body. Invariants: a body is accepted or refused with a status the API maps
// to 400/404 and an error body that names OpenAI's fields; an accepted call has 1..16
// choices and each of its gRPC requests converts (the HTTP path checks nothing less
// than gRPC); a refusal's message carries no user text (privacy).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "engine/model/tokenizer.h"
#include "fuzz/fuzz_util.h"
#include "server/chat_prompt.h"
#include "server/convert.h"
#include "server/openai_protocol.h"

namespace superpose::fuzz {
namespace {

namespace openai = server::openai;

std::unique_ptr<engine::Tokenizer> g_tokenizer;
std::unique_ptr<server::ChatPrompter> g_chat;
server::Limits g_limits;

// Messages are built from field names and numbers: printable ASCII only.
void CheckRefusal(const absl::Status& st, openai::Endpoint endpoint) {
  const openai::ApiError e = openai::ToApiError(st, endpoint);
  FUZZ_CHECK(e.http_status == 400 || e.http_status == 404);
  FUZZ_CHECK(e.body.contains("error") && e.body["error"].contains("message"));
  for (char c : st.message()) FUZZ_CHECK(c >= 0x20 && c <= 0x7E);
}

void CheckAccepted(const openai::CallPlan& plan) {
  FUZZ_CHECK(plan.num_choices() >= 1 && plan.num_choices() <= openai::kMaxChoices);
  if (plan.rag) {
    auto r = server::ToEngineRagRequest(plan.rag_request, *g_tokenizer, g_limits);
    FUZZ_CHECK(r.ok() || r.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  for (const v1::GenerateRequest& req : plan.prompts) {
    auto r = server::ToEngineRequest(req, *g_tokenizer, g_limits);
    FUZZ_CHECK(r.ok() || r.status().code() == absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace superpose::fuzz;
  const std::string model = SharedDir() + "/fixtures/stories260k";
  auto t = superpose::engine::Tokenizer::FromDir(model);
  if (!t.ok()) {
    std::fprintf(stderr, "fuzz: %s\n", t.status().ToString().c_str());
    std::exit(2);
  }
  g_tokenizer = std::move(*t);
  auto chat = superpose::server::ChatPrompter::Load(
      std::string(SP_SOURCE_DIR) + "/tests/chat_templates/chatml-bos.jinja", model, *g_tokenizer);
  if (!chat.ok()) {
    std::fprintf(stderr, "fuzz: %s\n", chat.status().ToString().c_str());
    std::exit(2);
  }
  g_chat = std::make_unique<superpose::server::ChatPrompter>(std::move(*chat));
  g_limits.context_length = 512;  // stories260k's max_position_embeddings
  g_limits.vocab_size = g_tokenizer->vocab_size();
  g_limits.max_text_bytes = 512 * 32;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace superpose::fuzz;
  if (size < 1 || size > 16 * 1024) return 0;
  const openai::Endpoint endpoint =
      data[0] % 2 == 0 ? openai::Endpoint::kCompletions : openai::Endpoint::kChat;
  const nlohmann::json body = nlohmann::json::parse(data + 1, data + size, nullptr,
                                                    /*allow_exceptions=*/false);
  if (body.is_discarded()) return 0;  // the server answers 400 before parsing fields
  openai::ParseContext ctx;
  ctx.model_name = "stories260k";
  ctx.chat = g_chat.get();
  ctx.limits = &g_limits;
  absl::StatusOr<openai::CallPlan> plan = openai::ParseCall(body, endpoint, ctx);
  if (plan.ok()) {
    CheckAccepted(*plan);
  } else {
    CheckRefusal(plan.status(), endpoint);
  }
  return 0;
}
