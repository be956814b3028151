// A small Jinja interpreter for chat templates: the subset that Hugging Face chat
// templates use, with the semantics of @huggingface/jinja (the renderer that
// transformers.js and the Hub use), so that outputs match it byte for byte. The
// template is lexed and parsed once (jinja_parser.cc) into an AST that Render() walks
// (jinja_eval.cc) over values of jinja_value.h. Render() is bounded: a step budget and
// an output size cap stop a template that loops forever or builds huge strings.
#ifndef SUPERPOSE_ENGINE_MODEL_JINJA_H_
#define SUPERPOSE_ENGINE_MODEL_JINJA_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"

namespace superpose::model::jinja {

struct Node;

struct RenderLimits {
  // Evaluation steps (expressions, statements, loop iterations, elements built).
  int64_t max_steps = 20'000'000;
  // Bytes of any one string built, the output included.
  int64_t max_output_bytes = 64 << 20;
  // Nested macro calls (each may nest expressions ~350 deep: the stack stays small).
  int max_call_depth = 32;
};

class Template {
 public:
  // Lexes and parses `source` (trim_blocks and lstrip_blocks on, as transformers and
  // @huggingface/jinja set them). A syntax error is InvalidArgument with line:column.
  static absl::StatusOr<Template> Parse(const std::string& source);

  // Renders with `context` (a JSON object: its keys become variables; ordered_json, so
  // that dicts keep their key order as in Python). `now` is what
  // strftime_now() formats (UTC). A run-time error is InvalidArgument; a
  // raise_exception("...") call's status message is exactly its argument; a budget
  // that runs out is ResourceExhausted.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context, absl::Time now,
                                     const RenderLimits& limits = {}) const;

 private:
  explicit Template(std::shared_ptr<const Node> root) : root_(std::move(root)) {}
  std::shared_ptr<const Node> root_;
};

}  // namespace superpose::model::jinja

#endif  // SUPERPOSE_ENGINE_MODEL_JINJA_H_
