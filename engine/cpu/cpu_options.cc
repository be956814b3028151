#include "engine/cpu/cpu_options.h"

#include "engine/util/status.h"

namespace superpose::engine::cpu {

absl::StatusOr<CpuOptions> ParseCpuOptions(const BackendFlags& flags) {
  SP_RETURN_IF_ERROR(
      CheckFlagNames(flags, "cpu", {"cpu_dtype", "kv_cache_dtype", "cpu_row_sampling"}));
  CpuOptions o;
  SP_RETURN_IF_ERROR(ParseFlagChoice(flags, "cpu_dtype",
                                     {{"auto", WeightDType::kAuto},
                                      {"float32", WeightDType::kFloat32},
                                      {"bfloat16", WeightDType::kBFloat16},
                                      {"int8", WeightDType::kInt8},
                                      {"q4", WeightDType::kQ4}},
                                     &o.dtype));
  SP_RETURN_IF_ERROR(ParseFlagChoice(flags, "kv_cache_dtype",
                                     {{"auto", KvCacheDType::kAuto},
                                      {"float32", KvCacheDType::kFloat32},
                                      {"bfloat16", KvCacheDType::kBFloat16}},
                                     &o.kv_cache_dtype));
  SP_RETURN_IF_ERROR(ParseFlagBool(flags, "cpu_row_sampling", &o.row_sampling));
  return o;
}

}  // namespace superpose::engine::cpu
