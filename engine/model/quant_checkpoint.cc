#include "engine/model/quant_checkpoint.h"

#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/util/status.h"

namespace superpose::engine {

namespace fs = std::filesystem;

absl::StatusOr<QuantizedTensor> ReadAndQuantize(const WeightSource& weights,
                                                const std::string& name, WeightQuant kind,
                                                int64_t rows, int64_t cols) {
  std::vector<float> w(static_cast<size_t>(rows * cols));
  SP_RETURN_IF_ERROR(weights.ReadF32(name, {rows, cols}, w.data()));
  for (size_t i = 0; i < w.size(); ++i) {
    if (!std::isfinite(w[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' has a non-finite value at element ", i, ": it cannot be quantized"));
    }
  }
  return Quantize(kind, w.data(), rows, cols);
}

namespace {

// One tensor of the output file: its header entry and how to produce its bytes.
struct OutTensor {
  std::string name;
  const char* dtype;  // safetensors name
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  std::function<absl::Status(std::string* bytes)> produce;
};

template <typename T>
std::string Bytes(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The projection `name` as three (or two) output tensors sharing one quantization, done
// when the first of them is written.
void AddQuantized(const WeightSource& src, const std::string& name, const TensorView& view,
                  WeightQuant kind, std::vector<OutTensor>* out) {
  const int64_t rows = view.shape[0], cols = view.shape[1];
  const std::string base = QuantBaseName(name);
  auto cache = std::make_shared<QuantizedTensor>();
  auto get = [&src, name, kind, rows, cols, cache]() -> absl::Status {
    if (cache->kind != WeightQuant::kNone) return absl::OkStatus();
    SP_ASSIGN_OR_RETURN(*cache, ReadAndQuantize(src, name, kind, rows, cols));
    return absl::OkStatus();
  };
  const bool q4 = kind == WeightQuant::kQ4;
  const int64_t rb = q4 ? Q4RowBytes(cols) : cols;
  out->push_back({base + ".qweight",
                  q4 ? "U8" : "I8",
                  {rows, rb},
                  static_cast<uint64_t>(rows * rb),
                  [get, cache](std::string* b) {
                    SP_RETURN_IF_ERROR(get());
                    *b = Bytes(cache->codes);
                    return absl::OkStatus();
                  }});
  if (q4) {
    const int64_t groups = Q4Groups(cols);
    out->push_back({base + ".lut",
                    "F16",
                    {groups, kQ4Levels},
                    static_cast<uint64_t>(groups * kQ4Levels * 2),
                    [get, cache](std::string* b) {
                      SP_RETURN_IF_ERROR(get());
                      *b = Bytes(cache->lut);
                      *cache = QuantizedTensor{};  // done with this projection
                      return absl::OkStatus();
                    }});
  } else {
    out->push_back({base + ".scales",
                    "F32",
                    {rows},
                    static_cast<uint64_t>(rows * 4),
                    [get, cache](std::string* b) {
                      SP_RETURN_IF_ERROR(get());
                      *b = Bytes(cache->scales);
                      *cache = QuantizedTensor{};
                      return absl::OkStatus();
                    }});
  }
}

absl::StatusOr<std::vector<OutTensor>> PlanTensors(const WeightSource& src, WeightQuant kind,
                                                   int64_t* quantized) {
  std::vector<OutTensor> out;
  for (const std::string& name : src.Names()) {
    SP_ASSIGN_OR_RETURN(TensorView v, src.Get(name));
    if (IsQuantizableWeight(name) && v.shape.size() == 2) {
      AddQuantized(src, name, v, kind, &out);
      ++*quantized;
      continue;
    }
    out.push_back({name, SafetensorsDTypeName(v.dtype), v.shape, v.nbytes, [v](std::string* b) {
                     b->assign(static_cast<const char*>(v.data), v.nbytes);
                     return absl::OkStatus();
                   }});
  }
  return out;
}

// The safetensors file: header (8-byte aligned with spaces), then each tensor's bytes in
// header order. Written to a temporary name and renamed.
absl::StatusOr<int64_t> WriteTensors(const std::string& path, const std::vector<OutTensor>& ts) {
  nlohmann::ordered_json header;
  header["__metadata__"] = {{"format", "pt"}, {"quantized_by", "superpose-quantize"}};
  uint64_t offset = 0;
  for (const OutTensor& t : ts) {
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
  if (!f) return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot create"));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i)
    len[i] = static_cast<uint8_t>(static_cast<uint64_t>(h.size()) >> (8 * i));
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(h.data(), static_cast<std::streamsize>(h.size()));
  std::string bytes;
  for (const OutTensor& t : ts) {
    absl::Status s = t.produce(&bytes);
    if (s.ok() && bytes.size() != t.nbytes) {
      s = absl::InternalError(absl::StrCat("tensor '", t.name, "': ", bytes.size(),
                                           " bytes produced, ", t.nbytes, " planned"));
    }
    if (!s.ok()) {
      f.close();
      std::remove(tmp.c_str());
      return s;
    }
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  f.close();
  if (!f || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return absl::InternalError(absl::StrCat(path, ": write failed (", std::strerror(errno), ")"));
  }
  return static_cast<int64_t>(8 + h.size() + offset);
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

// config.json with the quantization block; the other files as they are.
absl::Status WriteSideFiles(const std::string& src_dir, const std::string& dst_dir,
                            WeightQuant kind) {
  SP_ASSIGN_OR_RETURN(nlohmann::json config, ReadJsonFile(src_dir + "/config.json"));
  config["quantization_config"] = QuantizationConfigJson(kind);
  std::ofstream out(dst_dir + "/config.json", std::ios::trunc);
  out << config.dump(2) << "\n";
  if (!out) return absl::InternalError(absl::StrCat(dst_dir, "/config.json: write failed"));
  std::error_code ec;
  for (const fs::directory_entry& e : fs::directory_iterator(src_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name == "config.json" || absl::EndsWith(name, ".safetensors") ||
        name == "model.safetensors.index.json") {
      continue;
    }
    const fs::path to = fs::path(dst_dir) / name;
    fs::copy_file(e.path(), to, fs::copy_options::overwrite_existing, ec);
    if (!ec) fs::permissions(to, fs::perms::owner_write, fs::perm_options::add, ec);
    if (ec) return absl::InternalError(absl::StrCat(name, ": copy failed: ", ec.message()));
  }
  if (ec) return absl::InternalError(absl::StrCat(src_dir, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<QuantizeSummary> QuantizeCheckpoint(const std::string& src_dir,
                                                   const std::string& dst_dir, WeightQuant kind) {
  if (kind == WeightQuant::kNone) return absl::InvalidArgumentError("quantization: none");
  SP_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(src_dir));
  if (config.quantization != WeightQuant::kNone) {
    return absl::InvalidArgumentError(absl::StrCat(src_dir, "/config.json: already quantized (",
                                                   WeightQuantName(config.quantization), ")"));
  }
  std::error_code ec;
  if (fs::exists(dst_dir, ec) && fs::equivalent(src_dir, dst_dir, ec)) {
    return absl::InvalidArgumentError("the output directory is the input directory");
  }
  fs::create_directories(dst_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dst_dir, ": ", ec.message()));
  SP_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> src, OpenSafetensors(src_dir));
  QuantizeSummary summary;
  SP_ASSIGN_OR_RETURN(std::vector<OutTensor> tensors,
                      PlanTensors(*src, kind, &summary.quantized_tensors));
  summary.copied_tensors = static_cast<int64_t>(src->Names().size()) - summary.quantized_tensors;
  SP_ASSIGN_OR_RETURN(summary.bytes_written, WriteTensors(dst_dir + "/model.safetensors", tensors));
  SP_RETURN_IF_ERROR(WriteSideFiles(src_dir, dst_dir, kind));
  return summary;
}

}  // namespace superpose::engine
