// Weight sources: memory-mapped safetensors (single file or sharded) and in-memory.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/config.h"

namespace superpose::engine {

struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // valid while the WeightSource lives
  size_t nbytes = 0;
  int64_t numel() const;
};

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual bool Has(std::string_view name) const = 0;
  // NOT_FOUND naming the tensor when absent.
  virtual absl::StatusOr<TensorView> Get(std::string_view name) const = 0;
  virtual std::vector<std::string> Names() const = 0;
  // Where the tensor is stored (a file path), for error messages; "" when not a file.
  virtual std::string Location(std::string_view name) const { return ""; }

  // Copies the tensor widened to float32 into `out` (numel floats). Fails with a message
  // naming the tensor when its shape differs from `shape`.
  absl::Status ReadF32(std::string_view name, const std::vector<int64_t>& shape, float* out) const;
  // 2-D tensor [rows, cols]: copies the block rows [r0, r1) x cols [c0, c1), widened to
  // float32, row-major into `out` ((r1-r0)*(c1-c0) floats). Used for tensor-parallel
  // shards. `shape` is the full expected shape.
  absl::Status ReadF32Block(std::string_view name, const std::vector<int64_t>& shape, int64_t r0,
                            int64_t r1, int64_t c0, int64_t c1, float* out) const;
};

// Memory-maps `dir`/model.safetensors, or every shard listed in
// `dir`/model.safetensors.index.json. Errors name the file and the field.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensors(const std::string& dir);
// One safetensors file.
absl::StatusOr<std::unique_ptr<WeightSource>> OpenSafetensorsFile(const std::string& path);

// Owns float32 (or raw) tensors in memory: the built-in model, tests.
class InMemoryWeights : public WeightSource {
 public:
  void Add(const std::string& name, std::vector<int64_t> shape, std::vector<float> data);
  bool Has(std::string_view name) const override;
  absl::StatusOr<TensorView> Get(std::string_view name) const override;
  std::vector<std::string> Names() const override;

 private:
  struct Tensor {
    std::vector<int64_t> shape;
    std::vector<float> data;
  };
  std::map<std::string, Tensor, std::less<>> tensors_;
};

// The safetensors header name of `d` ("F32", "BF16", "I8", ...).
const char* SafetensorsDTypeName(DType d);

// Writes tensors to a safetensors file, converting float32 data to `dtype`.
struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                              DType dtype);

// Streaming variant (no float32 copy of the whole model in memory): the data of tensor
// `t` is produced in chunks by `fill(t, offset, count, out)`, which writes elements
// [offset, offset + count) of tensor t (row-major) as float32 to `out`.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};
using TensorFill = std::function<void(size_t t, int64_t offset, int64_t count, float* out)>;
absl::Status WriteSafetensorsStreaming(const std::string& path,
                                       const std::vector<TensorSpec>& tensors, DType dtype,
                                       const TensorFill& fill);

// Converts `n` elements of `dtype` at `src` (any alignment) to float32.
void ConvertToF32(DType dtype, const void* src, int64_t n, float* out);
// Converts `n` floats to `dtype` at `dst` (any alignment).
void ConvertFromF32(DType dtype, const float* src, int64_t n, void* dst);

// bf16 / fp16 <-> float32.
inline float Bf16ToF32(uint16_t v) {
  const uint32_t x = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
// Round to nearest even; NaN stays a (quiet) NaN with its sign.
inline uint16_t F32ToBf16(float v) {
  uint32_t x;
  std::memcpy(&x, &v, sizeof(x));
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  return static_cast<uint16_t>((x & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}
float F16ToF32(uint16_t v);
uint16_t F32ToF16(float v);

}  // namespace superpose::engine
