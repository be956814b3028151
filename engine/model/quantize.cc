#include "engine/model/quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/util/status.h"

namespace superpose::engine {

using json = nlohmann::json;

const char* WeightQuantName(WeightQuant q) {
  switch (q) {
    case WeightQuant::kNone:
      return "none";
    case WeightQuant::kInt8:
      return "int8";
    case WeightQuant::kQ4:
      return "q4";
  }
  return "?";
}

QuantizedTensor QuantizeInt8(const float* w, int64_t rows, int64_t cols) {
  QuantizedTensor t{WeightQuant::kInt8, rows, cols, {}, {}, {}};
  t.codes.resize(static_cast<size_t>(rows * cols));
  t.scales.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    float amax = 0.0f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::abs(row[c]));
    const float scale = amax / static_cast<float>(kInt8MaxCode);
    t.scales[r] = scale;
    for (int64_t c = 0; c < cols; ++c) {
      const float q = scale > 0.0f ? std::nearbyint(row[c] / scale) : 0.0f;
      const int8_t code = static_cast<int8_t>(
          std::clamp(q, -static_cast<float>(kInt8MaxCode), static_cast<float>(kInt8MaxCode)));
      t.codes[r * cols + c] = static_cast<uint8_t>(code);
    }
  }
  return t;
}

std::vector<float> FitQ4Table(std::vector<float> v) {
  std::vector<float> table(kQ4Levels, 0.0f);
  const int64_t n = static_cast<int64_t>(v.size());
  if (n == 0) return table;
  std::sort(v.begin(), v.end());
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + v[i];
  for (int32_t i = 0; i < kQ4Levels; ++i) {
    const int64_t at = static_cast<int64_t>((i + 0.5) / kQ4Levels * static_cast<double>(n));
    table[i] = v[std::min(at, n - 1)];
  }
  // Lloyd iterations in 1-D: the centroids stay sorted, so cluster i is the run of sorted
  // values up to the midpoint between centroids i and i + 1 (ties to the lower one).
  for (int32_t it = 0; it < kQ4KMeansIterations; ++it) {
    int64_t begin = 0;
    for (int32_t i = 0; i < kQ4Levels; ++i) {
      int64_t end = n;
      if (i + 1 < kQ4Levels) {
        const double mid = 0.5 * (static_cast<double>(table[i]) + table[i + 1]);
        end = std::upper_bound(v.begin() + begin, v.end(), mid,
                               [](double m, float x) { return m < x; }) -
              v.begin();
      }
      if (end > begin) {
        table[i] =
            static_cast<float>((prefix[end] - prefix[begin]) / static_cast<double>(end - begin));
      }
      begin = end;
    }
  }
  return table;
}

namespace {

// The index of the entry of `table` nearest to v (the lower index on a tie).
uint8_t NearestEntry(const float* table, float v) {
  uint8_t best = 0;
  float best_d = std::abs(v - table[0]);
  for (int32_t i = 1; i < kQ4Levels; ++i) {
    const float d = std::abs(v - table[i]);
    if (d < best_d) {
      best_d = d;
      best = static_cast<uint8_t>(i);
    }
  }
  return best;
}

// Column c's nibble of a q4 row: group c / 16, byte c % 8, high nibble for c % 16 >= 8.
inline size_t Q4Byte(int64_t c) { return static_cast<size_t>(c / kQ4GroupSize * 8 + c % 8); }
inline bool Q4High(int64_t c) { return c % kQ4GroupSize >= 8; }

}  // namespace

QuantizedTensor PalettizeQ4(const float* w, int64_t rows, int64_t cols) {
  QuantizedTensor t{WeightQuant::kQ4, rows, cols, {}, {}, {}};
  const int64_t groups = Q4Groups(cols), rb = Q4RowBytes(cols);
  t.codes.assign(static_cast<size_t>(rows * rb), 0);
  t.lut.resize(static_cast<size_t>(groups * kQ4Levels));
  std::vector<float> values;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c0 = g * kQ4GroupSize, c1 = std::min(cols, c0 + kQ4GroupSize);
    values.clear();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < c1; ++c) values.push_back(w[r * cols + c]);
    }
    const std::vector<float> fit = FitQ4Table(values);
    float table[kQ4Levels];
    for (int32_t i = 0; i < kQ4Levels; ++i) {
      t.lut[g * kQ4Levels + i] = F32ToF16(fit[i]);
      table[i] = F16ToF32(t.lut[g * kQ4Levels + i]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      uint8_t* row = &t.codes[static_cast<size_t>(r * rb)];
      for (int64_t c = c0; c < c1; ++c) {
        const uint8_t idx = NearestEntry(table, w[r * cols + c]);
        row[Q4Byte(c)] |= Q4High(c) ? static_cast<uint8_t>(idx << 4) : idx;
      }
    }
  }
  return t;
}

QuantizedTensor Quantize(WeightQuant kind, const float* w, int64_t rows, int64_t cols) {
  return kind == WeightQuant::kQ4 ? PalettizeQ4(w, rows, cols) : QuantizeInt8(w, rows, cols);
}

void DequantizeRows(const QuantizedTensor& t, int64_t r0, int64_t r1, float* out) {
  const int64_t cols = t.cols, rb = t.row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = &t.codes[static_cast<size_t>(r * rb)];
    float* o = out + (r - r0) * cols;
    if (t.kind == WeightQuant::kInt8) {
      for (int64_t c = 0; c < cols; ++c) {
        o[c] = static_cast<float>(static_cast<int8_t>(row[c])) * t.scales[r];
      }
      continue;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t b = row[Q4Byte(c)];
      const int32_t idx = Q4High(c) ? b >> 4 : b & 15;
      o[c] = F16ToF32(t.lut[(c / kQ4GroupSize) * kQ4Levels + idx]);
    }
  }
}

bool IsQuantizableWeight(std::string_view name) {
  const absl::string_view n(name.data(), name.size());
  if (n == "lm_head.weight") return true;
  if (!absl::StartsWith(n, "model.layers.")) return false;
  for (const char* p : {".self_attn.q_proj.weight", ".self_attn.k_proj.weight",
                        ".self_attn.v_proj.weight", ".self_attn.o_proj.weight",
                        ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight"}) {
    if (absl::EndsWith(n, p)) return true;
  }
  return false;
}

std::string QuantBaseName(std::string_view weight_name) {
  std::string s(weight_name);
  if (absl::EndsWith(s, ".weight")) s.resize(s.size() - 7);
  return s;
}

bool HasQuantized(const WeightSource& weights, std::string_view base) {
  return weights.Has(std::string(base) + ".qweight");
}

namespace {

absl::Status ExpectTensor(const WeightSource& w, const std::string& name, const TensorView& v,
                          DType dtype, const std::vector<int64_t>& shape) {
  if (v.dtype == dtype && v.shape == shape) return absl::OkStatus();
  std::string want, got;
  for (int64_t d : shape) absl::StrAppend(&want, want.empty() ? "" : ", ", d);
  for (int64_t d : v.shape) absl::StrAppend(&got, got.empty() ? "" : ", ", d);
  const std::string loc = w.Location(name);
  return absl::InvalidArgumentError(absl::StrCat(loc.empty() ? "" : loc + ": ", "tensor '", name,
                                                 "': expected ", DTypeName(dtype), " [", want,
                                                 "], got ", DTypeName(v.dtype), " [", got, "]"));
}

}  // namespace

absl::StatusOr<QuantizedTensor> ReadQuantized(const WeightSource& weights, const std::string& base,
                                              WeightQuant kind, int64_t rows, int64_t cols) {
  QuantizedTensor t{kind, rows, cols, {}, {}, {}};
  const std::string qname = base + ".qweight";
  SP_ASSIGN_OR_RETURN(TensorView q, weights.Get(qname));
  const DType code_type = kind == WeightQuant::kQ4 ? DType::kU8 : DType::kI8;
  SP_RETURN_IF_ERROR(ExpectTensor(weights, qname, q, code_type, {rows, t.row_bytes()}));
  const uint8_t* bytes = static_cast<const uint8_t*>(q.data);
  t.codes.assign(bytes, bytes + q.nbytes);
  if (kind == WeightQuant::kInt8) {
    t.scales.resize(static_cast<size_t>(rows));
    SP_RETURN_IF_ERROR(weights.ReadF32(base + ".scales", {rows}, t.scales.data()));
    return t;
  }
  const std::string lname = base + ".lut";
  SP_ASSIGN_OR_RETURN(TensorView lut, weights.Get(lname));
  SP_RETURN_IF_ERROR(ExpectTensor(weights, lname, lut, DType::kF16, {Q4Groups(cols), kQ4Levels}));
  t.lut.resize(static_cast<size_t>(Q4Groups(cols) * kQ4Levels));
  std::memcpy(t.lut.data(), lut.data, lut.nbytes);
  return t;
}

absl::Status ReadDequantizedBlock(const WeightSource& weights, const std::string& base,
                                  WeightQuant kind, int64_t rows, int64_t cols, int64_t r0,
                                  int64_t r1, int64_t c0, int64_t c1, float* out) {
  SP_ASSIGN_OR_RETURN(QuantizedTensor t, ReadQuantized(weights, base, kind, rows, cols));
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = r0; r < r1; ++r) {
    DequantizeRows(t, r, r + 1, row.data());
    std::copy(row.begin() + c0, row.begin() + c1, out + (r - r0) * (c1 - c0));
  }
  return absl::OkStatus();
}

absl::Status ReadQuantizationConfig(const json& config, const std::string& source,
                                    WeightQuant* out) {
  *out = WeightQuant::kNone;
  auto it = config.find("quantization_config");
  if (it == config.end() || it->is_null()) return absl::OkStatus();
  auto bad = [&](const std::string& field, const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": field 'quantization_config", field, "' ", why));
  };
  if (!it->is_object()) return bad("", "must be an object");
  const json& q = *it;
  const std::string method = q.value("quant_method", std::string());
  if (method != "superpose") {
    return bad(".quant_method", absl::StrCat("is \"", method,
                                             "\": only \"superpose\" checkpoints (written by "
                                             "superpose-quantize) are supported"));
  }
  const std::string w = q.value("weights", std::string());
  if (w == "int8") {
    *out = WeightQuant::kInt8;
  } else if (w == "q4") {
    *out = WeightQuant::kQ4;
  } else {
    return bad(".weights", absl::StrCat("is \"", w, "\", not one of int8, q4"));
  }
  if (*out == WeightQuant::kQ4 && q.value("group_size", kQ4GroupSize) != kQ4GroupSize) {
    return bad(".group_size", absl::StrCat("must be ", kQ4GroupSize, " for q4"));
  }
  return absl::OkStatus();
}

json QuantizationConfigJson(WeightQuant kind) {
  json q = {{"quant_method", "superpose"}, {"weights", WeightQuantName(kind)}};
  if (kind == WeightQuant::kInt8) {
    q["granularity"] = "per_output_channel";
    q["scale_dtype"] = "float32";
  } else {
    q["group_size"] = kQ4GroupSize;
    q["group_axis"] = "input";
    q["lut_entries"] = kQ4Levels;
    q["lut_dtype"] = "float16";
    q["kmeans_iterations"] = kQ4KMeansIterations;
  }
  q["modules"] = {"q_proj",    "k_proj",  "v_proj",    "o_proj",
                  "gate_proj", "up_proj", "down_proj", "lm_head (untied)"};
  return q;
}

}  // namespace superpose::engine
