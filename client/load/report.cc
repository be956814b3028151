#include "client/load/report.h"

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace superpose::load {
namespace {

using nlohmann::json;

json LatencyJson(const Latency& l) {
  return {{"mean", l.mean}, {"p50", l.p50}, {"p90", l.p90},
          {"p99", l.p99},   {"max", l.max}, {"count", l.count}};
}

json SettingsJson(const Settings& s) {
  json j = {{"server", s.server},
            {"tls", !s.tls.ca.empty()},
            {"tenant", s.tenant},
            {"loop", s.open_loop ? "open" : "closed"},
            {"concurrency", s.concurrency},
            {"rates", s.rates},
            {"duration_s", s.duration_s},
            {"requests", s.requests},
            {"requests_per_stream", s.requests_per_stream},
            {"warmup_requests", s.warmup_requests},
            {"max_inflight", s.max_inflight},
            {"seed", s.seed},
            {"workload", s.workload},
            {"input_len", s.input_len.ToString()},
            {"output_len", s.output_len.ToString()},
            {"prompt_ids", s.prompt_ids},
            {"text_file", s.text_file},
            {"shared_prefix_tokens", s.shared_prefix_tokens},
            {"prefixes", s.prefixes},
            {"jsonl", s.jsonl},
            {"affinity", s.affinity.rfind("key:", 0) == 0 ? "key" : s.affinity},
            {"slo_ttft_ms", s.slo_ttft_ms},
            {"slo_itl_ms", s.slo_itl_ms},
            {"timeout_s", s.timeout_s},
            {"temperature", s.temperature},
            {"top_k", s.top_k},
            {"top_p", s.top_p},
            {"ignore_eos", s.ignore_eos}};
  if (s.workload == "rag") {
    j["rag"] = {{"docs", s.rag.docs},
                {"pool", s.rag.pool},
                {"doc_sets", s.rag.doc_sets},
                {"doc_tokens", s.rag.doc_tokens},
                {"query_tokens", s.rag.query_tokens},
                {"mode", s.rag.mode},
                {"top_k", s.rag.top_k},
                {"path_cache", s.rag.path_cache}};
  }
  return j;
}

json LevelJson(const LevelReport& r) {
  json j = {{"loop", r.loop},
            {"level", r.level},
            {"seconds", r.seconds},
            {"requests", r.requests},
            {"ok", r.ok},
            {"errors", r.errors},
            {"errors_by_status", r.errors_by_status},
            {"input_tokens", r.input_tokens},
            {"output_tokens", r.output_tokens},
            {"requests_per_s", r.RequestsPerSecond()},
            {"input_tok_s", r.InputTokensPerSecond()},
            {"output_tok_s", r.OutputTokensPerSecond()},
            {"good", r.good},
            {"goodput_req_s", r.Goodput()},
            {"goodput_fraction", r.requests > 0 ? static_cast<double>(r.good) / r.requests : 0},
            {"ttft_ms", LatencyJson(r.ttft)},
            {"itl_ms", LatencyJson(r.itl)},
            {"tpot_ms", LatencyJson(r.tpot)},
            {"e2e_ms", LatencyJson(r.e2e)}};
  // The fields of the earlier format (bench/peer_compare.sh, bench/batching.sh read them).
  if (r.loop == "closed") j["streams"] = static_cast<int>(r.level);
  j["tokens"] = r.output_tokens;
  j["tok_s"] = r.OutputTokensPerSecond();
  j["ttft_ms_p50"] = r.ttft.p50;
  j["ttft_ms_p99"] = r.ttft.p99;
  j["itl_ms_p50"] = r.itl.p50;
  j["itl_ms_p99"] = r.itl.p99;
  j["e2e_ms_p50"] = r.e2e.p50;
  j["e2e_ms_max"] = r.e2e.max;
  return j;
}

json TotalsJson(const Totals& t) {
  return {{"requests", t.requests},
          {"input_tokens", t.input_tokens},
          {"output_tokens", t.output_tokens}};
}

std::string Row(const std::vector<std::string>& cells) {
  return absl::StrCat("| ", absl::StrJoin(cells, " | "), " |\n");
}

std::string F(double v, int digits = 1) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

}  // namespace

void PrintTables(const Settings& s, const std::vector<LevelReport>& levels) {
  std::string out = Row({"level", "requests", "errors", "req/s", "input tok/s", "output tok/s",
                         "goodput req/s", "good %"});
  out += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const LevelReport& r : levels) {
    out +=
        Row({r.Label(), absl::StrCat(r.requests), absl::StrCat(r.errors),
             F(r.RequestsPerSecond(), 2), F(r.InputTokensPerSecond()), F(r.OutputTokensPerSecond()),
             F(r.Goodput(), 2), F(r.requests > 0 ? 100.0 * r.good / r.requests : 0)});
  }
  out += "\n" + Row({"level", "latency (ms)", "mean", "p50", "p90", "p99"});
  out += "|---|---|---:|---:|---:|---:|\n";
  for (const LevelReport& r : levels) {
    for (const auto& [name, l] : {std::pair{"TTFT", &r.ttft}, std::pair{"ITL", &r.itl},
                                  std::pair{"TPOT", &r.tpot}, std::pair{"E2E", &r.e2e}}) {
      out += Row({r.Label(), name, F(l->mean), F(l->p50), F(l->p90), F(l->p99)});
    }
  }
  for (const LevelReport& r : levels) {
    for (const auto& [code, n] : r.errors_by_status) {
      absl::StrAppend(&out, "\n", r.Label(), ": ", n, " x ", code);
    }
  }
  if (s.slo_ttft_ms > 0 || s.slo_itl_ms > 0) {
    absl::StrAppend(&out, "\ngoodput: requests with TTFT <= ", s.slo_ttft_ms,
                    " ms and mean ITL <= ", s.slo_itl_ms, " ms (0: no objective)");
  }
  std::fputs(out.c_str(), stdout);
  std::fputs("\n", stdout);
}

absl::Status WriteJson(const Settings& s, const std::vector<LevelReport>& levels,
                       const Totals& warmup, const Totals& measured) {
  json j = {{"settings", SettingsJson(s)},
            {"warmup", TotalsJson(warmup)},
            {"totals", TotalsJson(measured)},
            {"prompt_tokens", static_cast<int>(s.input_len.Mean())},
            {"max_new_tokens", static_cast<int>(s.output_len.Mean())},
            {"levels", json::array()}};
  for (const LevelReport& r : levels) j["levels"].push_back(LevelJson(r));
  std::ofstream f(s.json);
  f << j.dump(2) << "\n";
  if (!f) return absl::InvalidArgumentError("--json: cannot write " + s.json);
  return absl::OkStatus();
}

}  // namespace superpose::load
