#include "cuda/cuda_options.h"

#include "absl/strings/str_cat.h"
#include "engine/util/status.h"

namespace superpose::cuda {

absl::StatusOr<CudaOptions> ParseCudaOptions(const engine::BackendFlags& flags) {
  SP_RETURN_IF_ERROR(engine::CheckFlagNames(flags, "cuda",
                                            {"cuda_attention", "cuda_graphs", "cuda_split_decode",
                                             "cuda_row_sampling", "cuda_dtype", "kv_cache_dtype"}));
  if (auto it = flags.find("kv_cache_dtype");
      it != flags.end() && it->second != "auto" && it->second != "bfloat16") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_cache_dtype: '", it->second,
                     "' is not supported by the cuda backend, whose KV cache is bfloat16 (auto, "
                     "bfloat16)"));
  }
  CudaOptions o;
  SP_RETURN_IF_ERROR(engine::ParseFlagChoice(flags, "cuda_attention",
                                             {{"auto", CudaAttention::kAuto},
                                              {"simt", CudaAttention::kSimt},
                                              {"tensor_core", CudaAttention::kTensorCore}},
                                             &o.attention));
  SP_RETURN_IF_ERROR(engine::ParseFlagChoice(flags, "cuda_dtype",
                                             {{"auto", CudaDType::kAuto},
                                              {"bf16", CudaDType::kBf16},
                                              {"bfloat16", CudaDType::kBf16},
                                              {"int8", CudaDType::kInt8},
                                              {"q4", CudaDType::kQ4}},
                                             &o.dtype));
  SP_RETURN_IF_ERROR(engine::ParseFlagBool(flags, "cuda_graphs", &o.graphs));
  SP_RETURN_IF_ERROR(engine::ParseFlagBool(flags, "cuda_split_decode", &o.split_decode));
  SP_RETURN_IF_ERROR(engine::ParseFlagBool(flags, "cuda_row_sampling", &o.row_sampling));
  return o;
}

}  // namespace superpose::cuda
