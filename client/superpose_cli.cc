// superpose-cli: a small command-line client for superpose-server.
//   superpose-cli generate --prompt "Once upon a time" [--max_new_tokens 64]
//   superpose-cli tokenize --prompt "text" | detokenize --ids 1,2,3 | info | health
//   superpose-cli rag --preamble "..." --docs_file docs.txt --query "..." [--top_k_paths 2]
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/load/connection.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "superpose/v1/superpose.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "superpose-server address");
ABSL_FLAG(std::string, prompt, "", "Prompt text (generate, tokenize)");
ABSL_FLAG(std::string, ids, "",
          "Comma-separated token ids (detokenize; generate instead of --prompt)");
ABSL_FLAG(int32_t, max_new_tokens, 64, "Tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature (0: greedy)");
ABSL_FLAG(int32_t, top_k, 0, "top-k (0: off)");
ABSL_FLAG(double, top_p, 1.0, "top-p");
ABSL_FLAG(int64_t, seed, -1, "Sampling seed (-1: random)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Stop strings (comma-separated)");
ABSL_FLAG(bool, usage, true, "Print usage statistics after generation (to stderr)");
ABSL_FLAG(double, timeout_s, 300, "Deadline of the call in seconds");
ABSL_FLAG(std::string, api_key, "",
          "API key sent as 'authorization: Bearer <key>' (default: $SUPERPOSE_API_KEY; the "
          "environment keeps it out of the process list)");
// TLS (a server started with --tls_cert): the CA to trust, and for mutual TLS the
// client's certificate and key.
ABSL_FLAG(std::string, tls_ca, "", "PEM CA certificate(s) to verify the server by; enables TLS");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate (mutual TLS; with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name to verify the server's certificate against instead of --server's host");
ABSL_FLAG(std::string, adapter, "", "generate, rag: LoRA adapter name (adapter_id; empty: base)");
ABSL_FLAG(std::string, preamble, "", "rag: system prompt / instruction");
ABSL_FLAG(std::string, docs_file, "", "rag: file with one document per line");
ABSL_FLAG(std::string, query, "", "rag: the question");
ABSL_FLAG(std::string, postamble, "", "rag: answer header of the instruct template");
ABSL_FLAG(std::string, rag_mode, "superposition", "rag: superposition | naive");
ABSL_FLAG(int32_t, top_k_paths, 1, "rag: paths kept after scoring");
ABSL_FLAG(bool, path_cache, true, "rag: reuse document KV across requests");
ABSL_FLAG(double, canonical_span, 0, "rag: fixed equilibrium span S (0: per request)");

namespace v1 = superpose::v1;

namespace {

std::vector<uint32_t> ParseIds(const std::string& s) {
  std::vector<uint32_t> ids;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    uint32_t v;
    if (!absl::SimpleAtoi(part, &v)) {
      std::cerr << "--ids: not a token id list\n";
      std::exit(2);
    }
    ids.push_back(v);
  }
  return ids;
}

// Deadline and credentials of every call.
void Prepare(grpc::ClientContext* ctx) {
  ctx->set_deadline(
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_timeout_s) * 1000)));
  std::string key = absl::GetFlag(FLAGS_api_key);
  if (key.empty()) {
    const char* env = std::getenv("SUPERPOSE_API_KEY");
    if (env != nullptr) key = env;
  }
  if (!key.empty()) ctx->AddMetadata("authorization", "Bearer " + key);
}

int Fail(const grpc::Status& st) {
  std::cerr << "error: " << st.error_code() << " " << st.error_message() << "\n";
  return 1;
}

const char* FinishName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_EOS:
      return "eos";
    case v1::FINISH_REASON_CANCELLED:
      return "cancelled";
    default:
      return "unspecified";
  }
}

int Generate(v1::Superpose::Stub& stub) {
  v1::GenerateRequest req;
  if (!absl::GetFlag(FLAGS_ids).empty()) {
    for (uint32_t id : ParseIds(absl::GetFlag(FLAGS_ids))) req.mutable_token_ids()->add_ids(id);
  } else {
    req.set_text(absl::GetFlag(FLAGS_prompt));
  }
  auto* s = req.mutable_sampling();
  s->set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
  s->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  s->set_top_k(absl::GetFlag(FLAGS_top_k));
  s->set_top_p(static_cast<float>(absl::GetFlag(FLAGS_top_p)));
  if (absl::GetFlag(FLAGS_seed) >= 0) s->set_seed(absl::GetFlag(FLAGS_seed));
  for (const auto& stop : absl::GetFlag(FLAGS_stop)) req.add_stop(stop);
  req.set_adapter_id(absl::GetFlag(FLAGS_adapter));
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  v1::GenerateResponse last;
  std::cout << absl::GetFlag(FLAGS_prompt);
  while (reader->Read(&resp)) {
    std::cout << resp.text() << std::flush;
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) last = resp;
  }
  std::cout << "\n";
  grpc::Status st = reader->Finish();
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_usage)) {
    const v1::Usage& u = last.usage();
    const double decode_ms = u.total_time_ms() - u.time_to_first_token_ms();
    std::fprintf(
        stderr,
        "[finish=%s prompt_tokens=%u generated_tokens=%u cached=%u queue=%.1fms "
        "ttft=%.1fms total=%.1fms decode=%.1f tok/s]\n",
        FinishName(last.finish_reason()), u.prompt_tokens(), u.generated_tokens(),
        u.cached_prompt_tokens(), u.queue_time_ms(), u.time_to_first_token_ms(), u.total_time_ms(),
        u.generated_tokens() > 1 && decode_ms > 0 ? (u.generated_tokens() - 1) * 1000.0 / decode_ms
                                                  : 0.0);
  }
  return 0;
}

int Rag(v1::Superpose::Stub& stub) {
  v1::GenerateRagRequest req;
  req.set_preamble(absl::GetFlag(FLAGS_preamble));
  std::ifstream in(absl::GetFlag(FLAGS_docs_file));
  if (!in) {
    std::cerr << "--docs_file: cannot read '" << absl::GetFlag(FLAGS_docs_file) << "'\n";
    return 2;
  }
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) req.add_documents()->set_text(line);
  }
  req.set_query(absl::GetFlag(FLAGS_query));
  req.set_postamble(absl::GetFlag(FLAGS_postamble));
  auto* o = req.mutable_rag();
  o->set_mode(absl::GetFlag(FLAGS_rag_mode) == "naive" ? v1::RAG_MODE_NAIVE
                                                       : v1::RAG_MODE_SUPERPOSITION);
  o->set_top_k(absl::GetFlag(FLAGS_top_k_paths));
  o->set_path_cache(absl::GetFlag(FLAGS_path_cache));
  o->set_canonical_span(static_cast<float>(absl::GetFlag(FLAGS_canonical_span)));
  auto* s = req.mutable_sampling();
  s->set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
  s->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
  if (absl::GetFlag(FLAGS_seed) >= 0) s->set_seed(absl::GetFlag(FLAGS_seed));
  req.set_adapter_id(absl::GetFlag(FLAGS_adapter));
  for (const auto& stop : absl::GetFlag(FLAGS_stop)) req.add_stop(stop);
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub.GenerateRag(&ctx, req);
  v1::GenerateResponse resp, last;
  while (reader->Read(&resp)) {
    std::cout << resp.text() << std::flush;
    if (resp.has_rag()) last = resp;
  }
  std::cout << "\n";
  grpc::Status st = reader->Finish();
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_usage)) {
    const v1::RagReport& r = last.rag();
    for (const auto& d : r.documents()) {
      std::fprintf(stderr, "[doc %u%s%s tokens=%u score=%.4f %s%s]\n", d.index(),
                   d.id().empty() ? "" : " id=", d.id().c_str(), d.tokens(), d.score(),
                   d.kept() ? "kept" : "pruned", d.cached() ? " cached" : "");
    }
    std::fprintf(stderr,
                 "[computed_tokens=%llu path_cache_tokens=%llu pruned_tokens=%llu "
                 "ttft=%.1fms flops=%.3g critical_path=%.3g naive=%.3g]\n",
                 static_cast<unsigned long long>(r.computed_tokens()),
                 static_cast<unsigned long long>(r.path_cache_tokens()),
                 static_cast<unsigned long long>(r.pruned_tokens()),
                 last.usage().time_to_first_token_ms(), r.flops(), r.critical_path_flops(),
                 r.naive_flops());
  }
  return 0;
}

int Tokenize(v1::Superpose::Stub& stub) {
  v1::TokenizeRequest req;
  req.set_text(absl::GetFlag(FLAGS_prompt));
  v1::TokenizeResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Status st = stub.Tokenize(&ctx, req, &resp);
  if (!st.ok()) return Fail(st);
  std::cout << absl::StrJoin(resp.token_ids(), ",") << "\n";
  return 0;
}

int Detokenize(v1::Superpose::Stub& stub) {
  v1::DetokenizeRequest req;
  for (uint32_t id : ParseIds(absl::GetFlag(FLAGS_ids))) req.add_token_ids(id);
  v1::DetokenizeResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Status st = stub.Detokenize(&ctx, req, &resp);
  if (!st.ok()) return Fail(st);
  std::cout << resp.text() << "\n";
  return 0;
}

int Info(v1::Superpose::Stub& stub) {
  v1::ModelInfo resp;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Status st = stub.GetModelInfo(&ctx, v1::GetModelInfoRequest(), &resp);
  if (!st.ok()) return Fail(st);
  std::cout << resp.DebugString();
  return 0;
}

// Plaintext, or TLS when --tls_ca is given (client/load/connection.cc, shared with
// superpose-load); nullptr (after a message) on a bad file.
std::shared_ptr<grpc::Channel> MakeChannel() {
  const superpose::load::Tls tls = {absl::GetFlag(FLAGS_tls_ca), absl::GetFlag(FLAGS_tls_cert),
                                    absl::GetFlag(FLAGS_tls_key),
                                    absl::GetFlag(FLAGS_tls_server_name)};
  auto channel =
      superpose::load::MakeChannel(absl::GetFlag(FLAGS_server), tls, grpc::ChannelArguments());
  if (!channel.ok()) {
    std::cerr << channel.status().message() << "\n";
    return nullptr;
  }
  return *channel;
}

int Health(const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::Status st = stub->Check(&ctx, req, &resp);
  if (!st.ok()) return Fail(st);
  std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "superpose_cli");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::SetProgramUsageMessage(
      "superpose-cli COMMAND [flags]\n"
      "COMMAND: generate | rag | tokenize | detokenize | info | health");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string cmd = args[1];
  std::shared_ptr<grpc::Channel> channel = MakeChannel();
  if (channel == nullptr) return 2;
  auto stub = v1::Superpose::NewStub(channel);
  if (cmd == "generate") return Generate(*stub);
  if (cmd == "rag") return Rag(*stub);
  if (cmd == "tokenize") return Tokenize(*stub);
  if (cmd == "detokenize") return Detokenize(*stub);
  if (cmd == "info") return Info(*stub);
  if (cmd == "health") return Health(channel);
  std::cerr << "unknown command '" << cmd << "'\n" << absl::ProgramUsageMessage() << "\n";
  return 2;
}
