#include "engine/model/weights.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/util/status.h"

namespace superpose::engine {

// ---------------------------------------------------------------------------------------
// Scalar conversions.

namespace {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Branch-free (selects only) so that loops over it vectorize.
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;                   // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;  // rebias 15 -> 127
  const uint32_t infnan = (em << 13) + 0x70000000u;  // exponent 31 -> 255
  // Subnormal: m * 2^-24 = (2^-14 * (1 + m/1024)) - 2^-14, both exact in float.
  const uint32_t sub = FloatBits(BitsFloat((em << 13) + 0x38800000u) - 6.103515625e-05f);
  const uint32_t bits = em < 0x0400u ? sub : (em >= 0x7C00u ? infnan : normal);
  return BitsFloat(sign | bits);
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (ax < 0x38800000u) {
    // Below 2^-14: a half subnormal. Adding 0.5 (whose float ulp is 2^-24, the half
    // subnormal step) rounds to nearest even in hardware.
    const float r = BitsFloat(ax) + 0.5f;
    return static_cast<uint16_t>(sign | (FloatBits(r) - 0x3F000000u));
  }
  const uint32_t odd = (ax >> 13) & 1u;
  ax += 0xC8000FFFu + odd;  // rebias 127 -> 15 and round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

}  // namespace

float F16ToF32(uint16_t v) { return HalfToFloat(v); }
uint16_t F32ToF16(float v) { return FloatToHalf(v); }

void ConvertToF32(DType dtype, const void* src, int64_t n, float* out) {
  if (n <= 0) return;
  const uint8_t* p = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = BitsFloat(static_cast<uint32_t>(h) << 16);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = HalfToFloat(h);
      }
      return;
    case DType::kI8:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int8_t>(p[i]);
      return;
    case DType::kU8:
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      return;
  }
}

void ConvertFromF32(DType dtype, const float* src, int64_t n, void* dst) {
  if (n <= 0) return;
  uint8_t* p = static_cast<uint8_t*>(dst);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = F32ToBf16(src[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToHalf(src[i]);
        std::memcpy(p + 2 * i, &h, 2);
      }
      return;
    case DType::kI8:  // integer codes: rounded to nearest, saturated
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<uint8_t>(
            static_cast<int8_t>(std::lrint(std::clamp(src[i], -128.f, 127.f))));
      }
      return;
    case DType::kU8:
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<uint8_t>(std::lrint(std::clamp(src[i], 0.f, 255.f)));
      }
      return;
  }
}

// ---------------------------------------------------------------------------------------
// Helpers.

namespace {

using json = nlohmann::json;

std::string ShapeString(const std::vector<int64_t>& s) {
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

// numel with overflow and sign checks; false when invalid.
bool Numel(const std::vector<int64_t>& shape, int64_t* out) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  }
  *out = n;
  return true;
}

}  // namespace

const char* SafetensorsDTypeName(DType d) {
  switch (d) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kI8:
      return "I8";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

namespace {

// Element size of every dtype of the safetensors format (0: unknown name).
size_t SafetensorsDTypeSize(const std::string& s) {
  static const std::pair<const char*, size_t> kSizes[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  for (const auto& [name, size] : kSizes) {
    if (s == name) return size;
  }
  return 0;
}

// Debian 12's abseil has its own string_view.
inline absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

std::string TensorRef(std::string_view name, const std::string& location) {
  if (location.empty()) return absl::StrCat("tensor '", AV(name), "'");
  return absl::StrCat(location, ": tensor '", AV(name), "'");
}

// A read-only memory map of one file; unmapped in the destructor.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (data_ != nullptr) munmap(data_, size_);
  }

  absl::Status Open(const std::string& path) {
    path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      const std::string msg = absl::StrCat(path, ": cannot open (", std::strerror(err), ")");
      return err == ENOENT ? absl::NotFoundError(msg) : absl::PermissionDeniedError(msg);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": cannot stat (", std::strerror(err), ")"));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        return absl::ResourceExhaustedError(
            absl::StrCat(path, ": mmap failed (", std::strerror(err), ")"));
      }
      data_ = p;
    }
    ::close(fd);
    return absl::OkStatus();
  }

  const uint8_t* bytes() const { return static_cast<const uint8_t*>(data_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorEntry {
  TensorView view;
  std::string dtype_name;  // as in the header
  bool supported = true;
  const MappedFile* file = nullptr;
};

// One tensor's header entry: dtype, shape and a byte range inside the file's data.
absl::StatusOr<TensorEntry> ParseTensorEntry(const std::string& path, const std::string& name,
                                             const json& t, const MappedFile* file,
                                             const uint8_t* data, uint64_t data_size) {
  auto tbad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", why));
  };
  if (!t.is_object()) return tbad("header entry is not an object");
  auto dt = t.find("dtype");
  auto sh = t.find("shape");
  auto off = t.find("data_offsets");
  if (dt == t.end() || !dt->is_string()) return tbad("missing or non-string field 'dtype'");
  if (sh == t.end() || !sh->is_array()) return tbad("missing or non-list field 'shape'");
  if (off == t.end() || !off->is_array() || off->size() != 2) {
    return tbad("field 'data_offsets' must be a list [begin, end]");
  }
  TensorEntry e;
  e.file = file;
  e.dtype_name = dt->get<std::string>();
  const size_t esize = SafetensorsDTypeSize(e.dtype_name);
  if (esize == 0) return tbad(absl::StrCat("unknown dtype '", e.dtype_name, "'"));
  if (e.dtype_name == "F32") {
    e.view.dtype = DType::kF32;
  } else if (e.dtype_name == "F16") {
    e.view.dtype = DType::kF16;
  } else if (e.dtype_name == "BF16") {
    e.view.dtype = DType::kBF16;
  } else if (e.dtype_name == "I8") {  // quantized weights' codes (engine/model/quantize.h)
    e.view.dtype = DType::kI8;
  } else if (e.dtype_name == "U8") {
    e.view.dtype = DType::kU8;
  } else {
    e.supported = false;  // reported by Get(): unused tensors may be any dtype
  }
  for (const json& d : *sh) {
    if (!d.is_number_integer() && !d.is_number_unsigned()) {
      return tbad(absl::StrCat("field 'shape' ", sh->dump(), " is not a list of integers"));
    }
    if (d.is_number_integer() && d.get<int64_t>() < 0) {
      return tbad(absl::StrCat("field 'shape' ", sh->dump(), " has a negative size"));
    }
    e.view.shape.push_back(d.get<int64_t>());
  }
  uint64_t b = 0, en = 0;
  if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
    return tbad(absl::StrCat("field 'data_offsets' ", off->dump(),
                             " is not a pair of non-negative integers"));
  }
  b = (*off)[0].get<uint64_t>();
  en = (*off)[1].get<uint64_t>();
  if (b > en || en > data_size) {
    return tbad(absl::StrCat("field 'data_offsets' ", off->dump(), " is outside the file's data (",
                             data_size, " bytes after the header)"));
  }
  int64_t n = 0;
  if (!Numel(e.view.shape, &n) ||
      static_cast<uint64_t>(n) > std::numeric_limits<uint64_t>::max() / esize) {
    return tbad(absl::StrCat("field 'shape' ", sh->dump(), " is too large"));
  }
  if (static_cast<uint64_t>(n) * esize != en - b) {
    return tbad(absl::StrCat("field 'data_offsets' ", off->dump(), " spans ", en - b,
                             " bytes but shape ", ShapeString(e.view.shape), " of ", e.dtype_name,
                             " needs ", static_cast<uint64_t>(n) * esize));
  }
  e.view.data = data + b;
  e.view.nbytes = static_cast<size_t>(en - b);
  return e;
}

class SafetensorsWeights : public WeightSource {
 public:
  // Maps `path` and indexes its tensors; with `only`, just those names.
  absl::Status AddFile(const std::string& path, const std::set<std::string>* only) {
    auto file = std::make_unique<MappedFile>();
    SP_RETURN_IF_ERROR(file->Open(path));
    const size_t size = file->size();
    auto bad = [&](const std::string& why) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", why));
    };
    if (size < 8) {
      return bad(absl::StrCat("truncated safetensors file (", size,
                              " bytes, less than the 8-byte header size)"));
    }
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->bytes()[i];
    if (header_len > size - 8) {
      return bad(absl::StrCat("truncated safetensors file: header size ", header_len,
                              " exceeds the ", size - 8, " bytes after the size field"));
    }
    const char* hbegin = reinterpret_cast<const char*>(file->bytes() + 8);
    json header = json::parse(hbegin, hbegin + header_len, nullptr, /*allow_exceptions=*/false);
    if (header.is_discarded()) return bad("the safetensors header is not valid JSON");
    if (!header.is_object()) return bad("the safetensors header is not a JSON object");
    const uint8_t* data = file->bytes() + 8 + header_len;
    const uint64_t data_size = size - 8 - header_len;

    std::vector<std::pair<std::string, TensorEntry>> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      if (name == "__metadata__") continue;
      if (only != nullptr && only->count(name) == 0) continue;
      SP_ASSIGN_OR_RETURN(TensorEntry e,
                          ParseTensorEntry(path, name, it.value(), file.get(), data, data_size));
      entries.emplace_back(name, std::move(e));
    }
    for (auto& [name, e] : entries) {
      auto [it, inserted] = tensors_.emplace(name, e);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is in both ",
                                                       it->second.file->path(), " and ", path));
      }
    }
    files_.push_back(std::move(file));
    return absl::OkStatus();
  }

  bool Has(std::string_view name) const override { return tensors_.find(name) != tensors_.end(); }

  absl::StatusOr<TensorView> Get(std::string_view name) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) {
      return absl::NotFoundError(absl::StrCat("tensor '", AV(name), "' not found in ", Describe()));
    }
    const TensorEntry& e = it->second;
    if (!e.supported) {
      return absl::InvalidArgumentError(
          absl::StrCat(e.file->path(), ": tensor '", AV(name), "' has dtype ", e.dtype_name,
                       ", which is not supported (F32, F16, BF16, I8, U8 are)"));
    }
    return e.view;
  }

  std::vector<std::string> Names() const override {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& [n, t] : tensors_) out.push_back(n);
    return out;
  }

  std::string Location(std::string_view name) const override {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? "" : it->second.file->path();
  }

  void set_description(std::string d) { description_ = std::move(d); }

 private:
  std::string Describe() const {
    if (!description_.empty()) return description_;
    if (files_.size() == 1) return files_[0]->path();
    return "the checkpoint";
  }

  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorEntry, std::less<>> tensors_;
  std::string description_;
};

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open (", std::strerror(errno), ")"));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------------------------------
// TensorView, WeightSource.

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

// Integer tensors are quantized weights' codes (engine/model/quantize.h), never read as
// float32 weights.
absl::Status CheckFloat(std::string_view name, const std::string& location, DType d) {
  if (d != DType::kI8 && d != DType::kU8) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(TensorRef(name, location), ": has dtype ", d == DType::kI8 ? "I8" : "U8",
                   " (quantized codes), not a float tensor (F32, F16, BF16)"));
}

}  // namespace

absl::Status WeightSource::ReadF32(std::string_view name, const std::vector<int64_t>& shape,
                                   float* out) const {
  SP_ASSIGN_OR_RETURN(TensorView v, Get(name));
  SP_RETURN_IF_ERROR(CheckFloat(name, Location(name), v.dtype));
  if (v.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(TensorRef(name, Location(name)),
                                                   ": expected shape ", ShapeString(shape),
                                                   ", got ", ShapeString(v.shape)));
  }
  const int64_t n = v.numel();
  if (static_cast<uint64_t>(n) * DTypeSize(v.dtype) != v.nbytes) {
    return absl::InternalError(
        absl::StrCat(TensorRef(name, Location(name)), ": data size does not match its shape"));
  }
  ConvertToF32(v.dtype, v.data, n, out);
  return absl::OkStatus();
}

absl::Status WeightSource::ReadF32Block(std::string_view name, const std::vector<int64_t>& shape,
                                        int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                        float* out) const {
  SP_ASSIGN_OR_RETURN(TensorView v, Get(name));
  SP_RETURN_IF_ERROR(CheckFloat(name, Location(name), v.dtype));
  if (v.shape != shape || shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(TensorRef(name, Location(name)),
                                                   ": expected shape ", ShapeString(shape),
                                                   ", got ", ShapeString(v.shape)));
  }
  const int64_t rows = shape[0], cols = shape[1];
  if (r0 < 0 || r0 > r1 || r1 > rows || c0 < 0 || c0 > c1 || c1 > cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(TensorRef(name, Location(name)), ": block rows [", r0, ", ", r1, ") x cols [",
                     c0, ", ", c1, ") is outside the shape ", ShapeString(shape)));
  }
  if (static_cast<uint64_t>(v.numel()) * DTypeSize(v.dtype) != v.nbytes) {
    return absl::InternalError(
        absl::StrCat(TensorRef(name, Location(name)), ": data size does not match its shape"));
  }
  const size_t es = DTypeSize(v.dtype);
  const uint8_t* base = static_cast<const uint8_t*>(v.data);
  const int64_t w = c1 - c0;
  if (c0 == 0 && c1 == cols) {  // contiguous rows
    ConvertToF32(v.dtype, base + static_cast<size_t>(r0 * cols) * es, (r1 - r0) * cols, out);
    return absl::OkStatus();
  }
  for (int64_t r = r0; r < r1; ++r) {
    ConvertToF32(v.dtype, base + static_cast<size_t>(r * cols + c0) * es, w, out + (r - r0) * w);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------
// Opening.

absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensorsFile(const std::string& path) {
  try {
    auto w = std::make_unique<SafetensorsWeights>();
    SP_RETURN_IF_ERROR(w->AddFile(path, nullptr));
    return std::unique_ptr<WeightSource>(std::move(w));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensors(const std::string& dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  try {
    if (FileExists(index_path)) {
      SP_ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
      json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
      }
      auto wm = j.find("weight_map");
      if (wm == j.end() || !wm->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": missing field 'weight_map' (an object)"));
      }
      std::map<std::string, std::set<std::string>> by_file;
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": field 'weight_map' entry '",
                                                         it.key(), "' is not a file name"));
        }
        const std::string file = it.value().get<std::string>();
        if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..") {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": field 'weight_map' entry '",
                                                         it.key(), "' names \"", file,
                                                         "\", not a file in the same directory"));
        }
        by_file[file].insert(it.key());
      }
      if (by_file.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": field 'weight_map' is empty"));
      }
      auto w = std::make_unique<SafetensorsWeights>();
      w->set_description(index_path);
      for (const auto& [file, names] : by_file) {  // each shard opened once
        const std::string shard = dir + "/" + file;
        if (!FileExists(shard)) {
          return absl::NotFoundError(absl::StrCat(shard, ": shard listed in ", index_path,
                                                  " (field 'weight_map') does not exist"));
        }
        SP_RETURN_IF_ERROR(w->AddFile(shard, &names));
        for (const std::string& n : names) {
          if (!w->Has(n)) {
            return absl::InvalidArgumentError(absl::StrCat(
                index_path, ": tensor '", n, "' is mapped to ", file, " but that file lacks it"));
          }
        }
      }
      return std::unique_ptr<WeightSource>(std::move(w));
    }
    if (FileExists(single_path)) return OpenSafetensorsFile(single_path);
    return absl::NotFoundError(
        absl::StrCat(dir, ": no weights: neither ", single_path, " nor ", index_path, " exists"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(dir, ": ", e.what()));
  }
}

// ---------------------------------------------------------------------------------------
// InMemoryWeights.

void InMemoryWeights::Add(const std::string& name, std::vector<int64_t> shape,
                          std::vector<float> data) {
  tensors_[name] = Tensor{std::move(shape), std::move(data)};
}

bool InMemoryWeights::Has(std::string_view name) const {
  return tensors_.find(name) != tensors_.end();
}

absl::StatusOr<TensorView> InMemoryWeights::Get(std::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", AV(name), "' not found"));
  }
  const Tensor& t = it->second;
  int64_t n = 0;
  if (!Numel(t.shape, &n) || static_cast<size_t>(n) != t.data.size()) {
    return absl::InternalError(absl::StrCat("tensor '", AV(name), "' has ", t.data.size(),
                                            " values for shape ", ShapeString(t.shape)));
  }
  TensorView v;
  v.dtype = DType::kF32;
  v.shape = t.shape;
  v.data = t.data.data();
  v.nbytes = t.data.size() * sizeof(float);
  return v;
}

std::vector<std::string> InMemoryWeights::Names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [n, t] : tensors_) out.push_back(n);
  return out;
}

// ---------------------------------------------------------------------------------------
// Writing.

absl::Status WriteSafetensorsStreaming(const std::string& path,
                                       const std::vector<TensorSpec>& tensors, DType dtype,
                                       const TensorFill& fill) {
  try {
    // Header: tensors in the given order, data laid out in the same order.
    nlohmann::ordered_json header;
    header["__metadata__"] = {{"format", "pt"}};
    std::set<std::string> seen;
    std::vector<int64_t> numel(tensors.size());
    uint64_t offset = 0;
    const size_t es = DTypeSize(dtype);
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorSpec& t = tensors[i];
      if (t.name == "__metadata__" || !seen.insert(t.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": duplicate or reserved tensor name '", t.name, "'"));
      }
      if (!Numel(t.shape, &numel[i])) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": tensor '", t.name, "' has an invalid shape ", ShapeString(t.shape)));
      }
      const uint64_t bytes = static_cast<uint64_t>(numel[i]) * es;
      nlohmann::ordered_json e;
      e["dtype"] = SafetensorsDTypeName(dtype);
      e["shape"] = t.shape;
      e["data_offsets"] = {offset, offset + bytes};
      header[t.name] = std::move(e);
      offset += bytes;
    }
    std::string h = header.dump();
    // Pad with spaces so that the data starts 8-byte aligned (as the reference does).
    while (h.size() % 8 != 0) h.push_back(' ');

    const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
    FILE* f = std::fopen(tmp.c_str(), "wb");
    if (f == nullptr) {
      return absl::PermissionDeniedError(
          absl::StrCat(tmp, ": cannot create (", std::strerror(errno), ")"));
    }
    std::vector<char> iobuf(1 << 20);
    std::setvbuf(f, iobuf.data(), _IOFBF, iobuf.size());
    uint8_t len[8];
    uint64_t hl = h.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(hl >> (8 * i));
    bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
    constexpr int64_t kChunk = 1 << 20;
    std::vector<float> chunk;
    std::vector<uint8_t> conv;
    for (size_t i = 0; ok && i < tensors.size(); ++i) {
      for (int64_t o = 0; ok && o < numel[i]; o += kChunk) {
        const int64_t n = std::min(kChunk, numel[i] - o);
        chunk.resize(static_cast<size_t>(n));
        fill(i, o, n, chunk.data());
        conv.resize(static_cast<size_t>(n) * es);
        ConvertFromF32(dtype, chunk.data(), n, conv.data());
        ok = std::fwrite(conv.data(), 1, conv.size(), f) == conv.size();
      }
    }
    const int write_errno = errno;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok) {
      std::remove(tmp.c_str());
      return absl::DataLossError(
          absl::StrCat(tmp, ": write failed (", std::strerror(write_errno), ")"));
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp.c_str());
      return absl::PermissionDeniedError(
          absl::StrCat(path, ": cannot rename ", tmp, " to it (", std::strerror(err), ")"));
    }
    return absl::OkStatus();
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what()));
  }
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              DType dtype) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const NamedTensor& t : tensors) {
    int64_t n = 0;
    if (Numel(t.shape, &n) && n > 0 && t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "' has no data"));
    }
    specs.push_back(TensorSpec{t.name, t.shape});
  }
  return WriteSafetensorsStreaming(
      path, specs, dtype, [&](size_t t, int64_t offset, int64_t count, float* out) {
        std::memcpy(out, tensors[t].data + offset, static_cast<size_t>(count) * sizeof(float));
      });
}

}  // namespace superpose::engine
