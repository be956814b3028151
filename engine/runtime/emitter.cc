#include "engine/runtime/emitter.h"

#include <algorithm>

#include "engine/runtime/engine.h"

namespace superpose::engine {
namespace {
double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

bool Contains(const std::vector<int32_t>& ids, int32_t id) {
  return std::find(ids.begin(), ids.end(), id) != ids.end();
}
}  // namespace

void Emitter::EnsureStream(Sequence& seq) const {
  if (seq.stream == nullptr) seq.stream = std::make_shared<StreamState>(seq.req, tokenizer_);
}

Sampled Emitter::Sample(Sequence& seq, const RowView& row, std::vector<float>* scratch) const {
  const int32_t V = config_.vocab_size;
  Sampler& sampler = seq.stream->sampler;
  const Request& req = seq.req;
  Sampled out;
  if (row.sampled >= 0) {  // drawn by the backend; the compact row is for logprobs
    out.token = row.sampled;
    if (req.logprobs) {
      TokenLogprobs lp = LogprobsFromTop(row.top, row.top_lse, out.token, req.top_logprobs);
      lp.chosen = {out.token, row.sampled_logit - row.top_lse};
      out.logprobs.push_back(std::move(lp));
    }
  } else if (row.whole != nullptr) {
    scratch->assign(row.whole, row.whole + V);  // the penalties write into it
    out.token = sampler.Sample(absl::MakeSpan(*scratch));
    if (req.logprobs) {
      out.logprobs.push_back(
          ComputeLogprobs(absl::MakeConstSpan(row.whole, V), out.token, req.top_logprobs));
    }
  } else {
    out.token = sampler.SampleTop(row.top);
    if (req.logprobs) {
      out.logprobs.push_back(LogprobsFromTop(row.top, row.top_lse, out.token, req.top_logprobs));
    }
  }
  return out;
}

FinishReason Emitter::Emit(Sequence& seq, Sampled sampled) {
  // A recomputed (preempted) sequence has already streamed its tokens: the logits of
  // its last token give the next one as usual.
  StreamState& st = *seq.stream;
  const Request& req = seq.req;
  StreamEvent ev;
  const int32_t token = sampled.token;
  ev.logprobs = std::move(sampled.logprobs);
  st.sampler.Accept(token);
  seq.tokens.push_back(token);
  ++seq.generated;
  const absl::Time now = absl::Now();
  if (seq.first_token == absl::InfinitePast()) {
    seq.first_token = now;
    if (observer_ != nullptr) {
      observer_->OnFirstToken(Ms(seq.scheduled - seq.arrival), Ms(now - seq.arrival));
    }
  } else if (observer_ != nullptr) {
    observer_->OnToken(Ms(now - seq.last_token));
  }
  seq.last_token = now;
  ev.token_ids.push_back(token);

  FinishReason reason = FinishReason::kNone;
  bool stopped = false;
  ev.text = st.stop.Append(st.decoder.Step(token), &stopped);
  if (stopped || Contains(req.stop_token_ids, token)) {
    reason = FinishReason::kStop;
  } else if (Contains(config_.eos_token_ids, token) && !req.ignore_eos) {
    reason = FinishReason::kEos;
  } else if (seq.generated >= req.sampling.max_new_tokens ||
             seq.PositionOf(static_cast<int32_t>(seq.tokens.size())) >= max_context_) {
    reason = FinishReason::kLength;
  }
  seq.callback(std::move(ev));
  return reason;
}

StreamEvent Emitter::FinalEvent(Sequence& seq, FinishReason reason,
                                const absl::Status& status) const {
  StreamEvent ev;
  ev.finished = true;
  ev.finish_reason = reason;
  ev.status = status;
  if (status.ok() && seq.stream != nullptr && reason != FinishReason::kStop) {
    bool stopped = false;
    ev.text = seq.stream->stop.Append(seq.stream->decoder.Flush(), &stopped);
    ev.text += seq.stream->stop.Flush();
  }
  const absl::Time now = absl::Now();
  Usage& u = ev.usage;
  u.prompt_tokens = seq.prompt_len;
  u.generated_tokens = seq.generated;
  u.cached_prompt_tokens = seq.cached_prompt_tokens;
  u.queue_time_ms = seq.scheduled == absl::InfinitePast() ? Ms(now - seq.arrival)
                                                          : Ms(seq.scheduled - seq.arrival);
  u.ttft_ms = seq.first_token == absl::InfinitePast() ? 0 : Ms(seq.first_token - seq.arrival);
  u.total_time_ms = Ms(now - seq.arrival);
  if (seq.lazy.decided()) {
    u.lazy_boundaries = seq.lazy.boundaries;
    u.lazy_stage_tokens = seq.lazy.stage_tokens;
    u.lazy_revive = seq.lazy.revive;
    u.lazy_revived_tokens = seq.lazy.revived;
  }
  u.lazy_skipped = seq.lazy.skipped;
  return ev;
}

}  // namespace superpose::engine
