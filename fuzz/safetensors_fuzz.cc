// libFuzzer target: a whole safetensors file (8-byte header size, JSON header, data),
// opened through the loader's own path (OpenSafetensorsFile: open, fstat, mmap) from a
// memfd, so nothing touches the disk. Invariants:
//   - a rejected file gives INVALID_ARGUMENT naming the file (never INTERNAL, i.e. no
//     exception escaping the header checks);
//   - every tensor of an accepted file is exactly the bytes its data_offsets name (checked
//     against an independent reading of the header), its size matches shape x dtype, and
//     ReadF32 / ReadF32Block agree with each other.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/weights.h"
#include "fuzz/fuzz_util.h"

namespace superpose::fuzz {
namespace {

int g_fd = -1;
std::string g_path;

// The bytes [begin, end) of the data section that the header names for `name`.
bool HeaderRange(const uint8_t* data, size_t size, const std::string& name, uint64_t* begin,
                 uint64_t* end) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  const auto h = nlohmann::json::parse(data + 8, data + 8 + n, nullptr, false);
  const auto& off = h.at(name).at("data_offsets");
  *begin = 8 + n + off.at(0).get<uint64_t>();
  *end = 8 + n + off.at(1).get<uint64_t>();
  return *begin <= *end && *end <= size;
}

void CheckTensor(const engine::WeightSource& w, const std::string& name, const uint8_t* data,
                 size_t size) {
  FUZZ_CHECK(w.Has(name));
  absl::StatusOr<engine::TensorView> v = w.Get(name);
  if (!v.ok()) {  // only unsupported dtypes (I32, F64, ...) are refused here
    FUZZ_CHECK(v.status().code() == absl::StatusCode::kInvalidArgument);
    return;
  }
  uint64_t begin = 0, end = 0;
  FUZZ_CHECK(HeaderRange(data, size, name, &begin, &end));
  FUZZ_CHECK(v->nbytes == end - begin);
  FUZZ_CHECK(static_cast<uint64_t>(v->numel()) * engine::DTypeSize(v->dtype) == v->nbytes);
  FUZZ_CHECK(v->nbytes == 0 || std::memcmp(v->data, data + begin, v->nbytes) == 0);
  std::vector<float> all(static_cast<size_t>(v->numel()));
  if (v->dtype == engine::DType::kI8 || v->dtype == engine::DType::kU8) {  // quantized codes
    FUZZ_CHECK(!w.ReadF32(name, v->shape, all.data()).ok());
    return;
  }
  FUZZ_CHECK(w.ReadF32(name, v->shape, all.data()).ok());
  if (v->shape.size() == 2 && v->shape[1] > 0) {
    const int64_t rows = v->shape[0], cols = v->shape[1], c0 = cols / 3;
    std::vector<float> block(static_cast<size_t>(rows * (cols - c0)));
    FUZZ_CHECK(w.ReadF32Block(name, v->shape, 0, rows, c0, cols, block.data()).ok());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = c0; c < cols; ++c) {
        const float a = all[r * cols + c], b = block[r * (cols - c0) + (c - c0)];
        FUZZ_CHECK(std::memcmp(&a, &b, sizeof(float)) == 0);
      }
    }
  }
}

}  // namespace
}  // namespace superpose::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  superpose::fuzz::g_fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
  if (superpose::fuzz::g_fd < 0) {
    std::perror("memfd_create");
    std::exit(2);
  }
  superpose::fuzz::g_path = "/proc/self/fd/" + std::to_string(superpose::fuzz::g_fd);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace superpose::fuzz;
  if (size > 1 << 20) return 0;
  FUZZ_CHECK(ftruncate(g_fd, 0) == 0);
  FUZZ_CHECK(pwrite(g_fd, data, size, 0) == static_cast<ssize_t>(size));
  auto w = superpose::engine::OpenSafetensorsFile(g_path);
  if (!w.ok()) {
    FUZZ_CHECK(w.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(std::string(w.status().message()).rfind(g_path, 0) == 0);
    return 0;
  }
  for (const std::string& name : (*w)->Names()) CheckTensor(**w, name, data, size);
  FUZZ_CHECK(!(*w)->Has("__metadata__"));
  return 0;
}
