#include "engine/runtime/model_bundle.h"

#include "absl/strings/str_cat.h"
#include "engine/model/builtin.h"
#include "engine/util/status.h"

namespace superpose::engine {

absl::StatusOr<ModelBundle> LoadModelBundle(const std::string& dir) {
  ModelBundle bundle;
  if (dir.empty()) {
    BuiltinModel m = MakeBuiltinModel();
    bundle.name = "builtin";
    bundle.builtin = true;
    bundle.config = m.config;
    bundle.weights = std::move(m.weights);
    SP_ASSIGN_OR_RETURN(bundle.tokenizer,
                        Tokenizer::FromJson(m.tokenizer_json, "", "builtin tokenizer.json"));
  } else {
    SP_ASSIGN_OR_RETURN(bundle.config, LoadModelConfig(dir));
    SP_ASSIGN_OR_RETURN(bundle.weights, OpenSafetensors(dir));
    SP_ASSIGN_OR_RETURN(bundle.tokenizer, Tokenizer::FromDir(dir));
    std::string base = dir;
    while (base.size() > 1 && base.back() == '/') base.pop_back();
    const size_t slash = base.rfind('/');
    bundle.name = slash == std::string::npos ? base : base.substr(slash + 1);
  }
  if (bundle.config.eos_token_ids.empty() && bundle.tokenizer->eos_id()) {
    bundle.config.eos_token_ids.push_back(*bundle.tokenizer->eos_id());
  }
  if (bundle.tokenizer->vocab_size() > bundle.config.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/tokenizer.json: the tokenizer has ", bundle.tokenizer->vocab_size(),
                     " tokens but config.json vocab_size is ", bundle.config.vocab_size));
  }
  return bundle;
}

}  // namespace superpose::engine
