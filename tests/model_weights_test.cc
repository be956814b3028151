// safetensors reading (mmap, sharded index, validation), writing, dtype conversion.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/model/weights.h"

namespace superpose::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kStories = std::string(SP_SHARED_DIR) + "/fixtures/stories260k";

class TempDir {
 public:
  TempDir() {
    std::string tmpl = std::filesystem::temp_directory_path().string() + "/sp_weights_XXXXXX";
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// A safetensors file with the given header text and data bytes.
std::string RawSafetensors(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

// ---- The real fixture ---------------------------------------------------------------

TEST(SafetensorsTest, Stories260kOpensWith48Tensors) {
  auto w = OpenSafetensors(kStories);
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<std::string> names = (*w)->Names();
  EXPECT_EQ(names.size(), 48u);
  EXPECT_TRUE((*w)->Has("model.embed_tokens.weight"));
  EXPECT_TRUE((*w)->Has("model.layers.4.mlp.down_proj.weight"));
  EXPECT_FALSE((*w)->Has("model.layers.5.mlp.down_proj.weight"));
  EXPECT_FALSE((*w)->Has("__metadata__"));

  auto emb = (*w)->Get("model.embed_tokens.weight");
  ASSERT_TRUE(emb.ok());
  EXPECT_EQ(emb->dtype, DType::kF32);
  EXPECT_THAT(emb->shape, ElementsAre(512, 64));
  EXPECT_EQ(emb->numel(), 512 * 64);
  EXPECT_EQ(emb->nbytes, 512u * 64 * 4);
  auto q = (*w)->Get("model.layers.0.self_attn.q_proj.weight");
  ASSERT_TRUE(q.ok());
  EXPECT_THAT(q->shape, ElementsAre(64, 64));
  auto k = (*w)->Get("model.layers.0.self_attn.k_proj.weight");
  ASSERT_TRUE(k.ok());
  EXPECT_THAT(k->shape, ElementsAre(32, 64));
  auto down = (*w)->Get("model.layers.2.mlp.down_proj.weight");
  ASSERT_TRUE(down.ok());
  EXPECT_THAT(down->shape, ElementsAre(64, 172));
  auto norm = (*w)->Get("model.norm.weight");
  ASSERT_TRUE(norm.ok());
  EXPECT_THAT(norm->shape, ElementsAre(64));
  EXPECT_EQ((*w)->Location("model.norm.weight"), kStories + "/model.safetensors");

  std::vector<float> a(512 * 64), b(512 * 64);
  ASSERT_TRUE((*w)->ReadF32("model.embed_tokens.weight", {512, 64}, a.data()).ok());
  ASSERT_TRUE((*w)->ReadF32("lm_head.weight", {512, 64}, b.data()).ok());
  EXPECT_EQ(a, b);  // tied: an exact copy
  double sum_sq = 0;
  for (float x : a) {
    ASSERT_TRUE(std::isfinite(x));
    sum_sq += static_cast<double>(x) * x;
  }
  EXPECT_GT(sum_sq, 0.0);
}

TEST(SafetensorsTest, ShapeMismatchNamesTensorFileAndShapes) {
  auto w = OpenSafetensors(kStories);
  ASSERT_TRUE(w.ok());
  std::vector<float> buf(512 * 64);
  absl::Status st = (*w)->ReadF32("model.embed_tokens.weight", {64, 512}, buf.data());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.message(), HasSubstr("model.embed_tokens.weight"));
  EXPECT_THAT(st.message(), HasSubstr("model.safetensors"));
  EXPECT_THAT(st.message(), HasSubstr("expected shape [64, 512], got [512, 64]"));

  auto missing = (*w)->Get("model.layers.9.mlp.up_proj.weight");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("model.layers.9.mlp.up_proj.weight"));
  EXPECT_FALSE((*w)->ReadF32("nope", {1}, buf.data()).ok());
}

TEST(SafetensorsTest, ReadF32BlockCopiesASubBlock) {
  auto w = OpenSafetensors(kStories);
  ASSERT_TRUE(w.ok());
  const std::string name = "model.layers.1.mlp.gate_proj.weight";  // [172, 64]
  std::vector<float> full(172 * 64);
  ASSERT_TRUE((*w)->ReadF32(name, {172, 64}, full.data()).ok());
  std::vector<float> block(10 * 24);
  ASSERT_TRUE((*w)->ReadF32Block(name, {172, 64}, 86, 96, 8, 32, block.data()).ok());
  for (int r = 0; r < 10; ++r) {
    for (int c = 0; c < 24; ++c) ASSERT_EQ(block[r * 24 + c], full[(86 + r) * 64 + 8 + c]);
  }
  // Whole rows (the contiguous path).
  std::vector<float> rows(86 * 64);
  ASSERT_TRUE((*w)->ReadF32Block(name, {172, 64}, 86, 172, 0, 64, rows.data()).ok());
  EXPECT_TRUE(std::equal(rows.begin(), rows.end(), full.begin() + 86 * 64));
  // Empty block is fine; out of range is not.
  EXPECT_TRUE((*w)->ReadF32Block(name, {172, 64}, 5, 5, 0, 64, rows.data()).ok());
  absl::Status st = (*w)->ReadF32Block(name, {172, 64}, 100, 180, 0, 64, rows.data());
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr(name));
  EXPECT_THAT(st.message(), HasSubstr("[172, 64]"));
  EXPECT_FALSE((*w)->ReadF32Block(name, {172, 64}, 0, 1, 10, 5, rows.data()).ok());
  EXPECT_FALSE((*w)->ReadF32Block(name, {64, 172}, 0, 1, 0, 1, rows.data()).ok());
  EXPECT_FALSE((*w)->ReadF32Block("model.norm.weight", {64}, 0, 1, 0, 1, rows.data()).ok());
}

// ---- Writing and reading back --------------------------------------------------------

std::vector<float> TestValues(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

TEST(SafetensorsTest, WriteReadRoundTripInEachDType) {
  TempDir tmp;
  const std::vector<float> a = TestValues(6 * 10, 1), b = TestValues(7, 2);
  const std::vector<float> c = {0.0f, -0.0f, 1.0f, -2.5f, 65504.0f, 1e-3f};
  const std::vector<NamedTensor> tensors = {{"z.weight", {6, 10}, a.data()},
                                            {"a.bias", {7}, b.data()},
                                            {"m.c", {2, 3}, c.data()},
                                            {"empty", {0, 4}, nullptr}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(DTypeName(dt));
    const std::string path = tmp.path() + "/model.safetensors";
    ASSERT_TRUE(WriteSafetensors(path, tensors, dt).ok());

    // File layout: 8-byte aligned header, tensors in the given order, contiguous data.
    const std::string bytes = ReadAll(path);
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u);
    auto ordered = nlohmann::ordered_json::parse(bytes.substr(8, n));
    std::vector<std::string> keys;
    for (auto it = ordered.begin(); it != ordered.end(); ++it) keys.push_back(it.key());
    auto header = nlohmann::json::parse(bytes.substr(8, n));
    EXPECT_THAT(keys, ElementsAre("__metadata__", "z.weight", "a.bias", "m.c", "empty"));
    const uint64_t es = DTypeSize(dt);
    EXPECT_EQ(header["z.weight"]["data_offsets"], nlohmann::json({0, 60 * es}));
    EXPECT_EQ(header["a.bias"]["data_offsets"], nlohmann::json({60 * es, 67 * es}));
    EXPECT_EQ(header["empty"]["data_offsets"], nlohmann::json({73 * es, 73 * es}));
    EXPECT_EQ(bytes.size(), 8 + n + 73 * es);
    EXPECT_FALSE(std::filesystem::exists(path + ".tmp." + std::to_string(getpid())));

    auto w = OpenSafetensorsFile(path);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ((*w)->Names().size(), 4u);
    auto v = (*w)->Get("z.weight");
    ASSERT_TRUE(v.ok());
    EXPECT_EQ(v->dtype, dt);
    std::vector<float> ra(60), rb(7), rc(6);
    ASSERT_TRUE((*w)->ReadF32("z.weight", {6, 10}, ra.data()).ok());
    ASSERT_TRUE((*w)->ReadF32("a.bias", {7}, rb.data()).ok());
    ASSERT_TRUE((*w)->ReadF32("m.c", {2, 3}, rc.data()).ok());
    ASSERT_TRUE((*w)->ReadF32("empty", {0, 4}, nullptr).ok());
    for (size_t i = 0; i < a.size(); ++i) {
      if (dt == DType::kF32) {
        ASSERT_EQ(ra[i], a[i]);
      } else if (dt == DType::kBF16) {
        ASSERT_NEAR(ra[i], a[i], std::fabs(a[i]) * (1.0f / 256)) << i;
        ASSERT_EQ(ra[i], Bf16ToF32(F32ToBf16(a[i])));
      } else {
        ASSERT_NEAR(ra[i], a[i], std::fabs(a[i]) * (1.0f / 2048) + 1e-7f) << i;
        ASSERT_EQ(ra[i], F16ToF32(F32ToF16(a[i])));
      }
    }
    EXPECT_EQ(rc[0], 0.0f);
    EXPECT_TRUE(std::signbit(rc[1]));
    EXPECT_EQ(rc[2], 1.0f);
    EXPECT_EQ(rc[3], -2.5f);
    EXPECT_EQ(rc[4], dt == DType::kBF16 ? 65536.0f : 65504.0f);

    // Block reads convert too.
    std::vector<float> block(2 * 3);
    ASSERT_TRUE((*w)->ReadF32Block("z.weight", {6, 10}, 2, 4, 5, 8, block.data()).ok());
    for (int r = 0; r < 2; ++r) {
      for (int col = 0; col < 3; ++col) EXPECT_EQ(block[r * 3 + col], ra[(2 + r) * 10 + 5 + col]);
    }
  }
}

TEST(SafetensorsTest, WriteErrors) {
  TempDir tmp;
  const std::vector<float> a = {1, 2};
  absl::Status dup = WriteSafetensors(tmp.path() + "/x.safetensors",
                                      {{"t", {2}, a.data()}, {"t", {2}, a.data()}}, DType::kF32);
  ASSERT_FALSE(dup.ok());
  EXPECT_THAT(dup.message(), HasSubstr("'t'"));
  absl::Status nodata =
      WriteSafetensors(tmp.path() + "/x.safetensors", {{"t", {2}, nullptr}}, DType::kF32);
  EXPECT_FALSE(nodata.ok());
  absl::Status nodir = WriteSafetensors(tmp.path() + "/no/such/dir/x.safetensors",
                                        {{"t", {2}, a.data()}}, DType::kF32);
  ASSERT_FALSE(nodir.ok());
  EXPECT_THAT(nodir.message(), HasSubstr("/no/such/dir/x.safetensors"));
}

TEST(SafetensorsTest, StreamingWriterFillsInChunks) {
  TempDir tmp;
  const int64_t n = (1 << 20) + 123;  // more than one chunk
  const std::string path = tmp.path() + "/big.safetensors";
  ASSERT_TRUE(WriteSafetensorsStreaming(path, {{"big", {n}}, {"small", {3}}}, DType::kBF16,
                                        [](size_t t, int64_t off, int64_t count, float* out) {
                                          for (int64_t i = 0; i < count; ++i) {
                                            // Exact in bf16.
                                            out[i] = t == 0 ? static_cast<float>((off + i) % 256)
                                                            : 1000.0f + 8.0f * (off + i);
                                          }
                                        })
                  .ok());
  auto w = OpenSafetensorsFile(path);
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<float> big(n), small(3);
  ASSERT_TRUE((*w)->ReadF32("big", {n}, big.data()).ok());
  ASSERT_TRUE((*w)->ReadF32("small", {3}, small.data()).ok());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(big[i], static_cast<float>(i % 256)) << i;
  EXPECT_THAT(small, ElementsAre(1000.0f, 1008.0f, 1016.0f));
}

// ---- Sharded checkpoints --------------------------------------------------------------

TEST(SafetensorsTest, ShardedIndexWithTwoShards) {
  TempDir tmp;
  const std::vector<float> a = TestValues(12, 3), b = TestValues(5, 4), c = TestValues(8, 5);
  ASSERT_TRUE(WriteSafetensors(tmp.path() + "/model-00001-of-00002.safetensors",
                               {{"a", {3, 4}, a.data()}, {"b", {5}, b.data()}}, DType::kF32)
                  .ok());
  ASSERT_TRUE(WriteSafetensors(tmp.path() + "/model-00002-of-00002.safetensors",
                               {{"c", {2, 4}, c.data()}}, DType::kBF16)
                  .ok());
  nlohmann::json index = {{"metadata", {{"total_size", 100}}},
                          {"weight_map",
                           {{"a", "model-00001-of-00002.safetensors"},
                            {"b", "model-00001-of-00002.safetensors"},
                            {"c", "model-00002-of-00002.safetensors"}}}};
  WriteAll(tmp.path() + "/model.safetensors.index.json", index.dump());

  auto w = OpenSafetensors(tmp.path());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_THAT((*w)->Names(), ElementsAre("a", "b", "c"));
  std::vector<float> ra(12), rc(8);
  ASSERT_TRUE((*w)->ReadF32("a", {3, 4}, ra.data()).ok());
  EXPECT_EQ(ra, a);
  ASSERT_TRUE((*w)->ReadF32("c", {2, 4}, rc.data()).ok());
  for (int i = 0; i < 8; ++i) EXPECT_EQ(rc[i], Bf16ToF32(F32ToBf16(c[i])));
  EXPECT_EQ((*w)->Location("c"), tmp.path() + "/model-00002-of-00002.safetensors");
  std::vector<float> blk(2);
  ASSERT_TRUE((*w)->ReadF32Block("a", {3, 4}, 1, 2, 1, 3, blk.data()).ok());
  EXPECT_THAT(blk, ElementsAre(a[5], a[6]));
  auto missing = (*w)->Get("zzz");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("model.safetensors.index.json"));
}

TEST(SafetensorsTest, ShardErrors) {
  TempDir tmp;
  const std::vector<float> a = TestValues(4, 6);
  ASSERT_TRUE(
      WriteSafetensors(tmp.path() + "/s1.safetensors", {{"a", {4}, a.data()}}, DType::kF32).ok());
  const std::string index_path = tmp.path() + "/model.safetensors.index.json";

  WriteAll(index_path, R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  auto missing_shard = OpenSafetensors(tmp.path());
  ASSERT_FALSE(missing_shard.ok());
  EXPECT_EQ(missing_shard.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing_shard.status().message(), HasSubstr(tmp.path() + "/s2.safetensors"));
  EXPECT_THAT(missing_shard.status().message(), HasSubstr("model.safetensors.index.json"));

  WriteAll(index_path, R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  auto lacks = OpenSafetensors(tmp.path());
  ASSERT_FALSE(lacks.ok());
  EXPECT_THAT(lacks.status().message(), HasSubstr("'b'"));
  EXPECT_THAT(lacks.status().message(), HasSubstr("s1.safetensors"));

  WriteAll(index_path, R"({"metadata": {}})");
  auto no_map = OpenSafetensors(tmp.path());
  ASSERT_FALSE(no_map.ok());
  EXPECT_THAT(no_map.status().message(), HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(no_map.status().message(), HasSubstr("'weight_map'"));

  WriteAll(index_path, R"({"weight_map": {"a": "../s1.safetensors"}})");
  EXPECT_FALSE(OpenSafetensors(tmp.path()).ok());
  WriteAll(index_path, "{not json");
  auto bad_json = OpenSafetensors(tmp.path());
  ASSERT_FALSE(bad_json.ok());
  EXPECT_THAT(bad_json.status().message(), HasSubstr("model.safetensors.index.json"));
}

TEST(SafetensorsTest, MissingWeightsNameTheFiles) {
  TempDir tmp;
  auto w = OpenSafetensors(tmp.path());
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(w.status().message(), HasSubstr(tmp.path() + "/model.safetensors"));
  EXPECT_THAT(w.status().message(), HasSubstr("model.safetensors.index.json"));
  auto f = OpenSafetensorsFile(tmp.path() + "/nope.safetensors");
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(f.status().message(), HasSubstr("nope.safetensors"));
}

// ---- Validation of malformed files -----------------------------------------------------

struct BadFile {
  const char* what;
  std::string bytes;
  std::vector<std::string> expect;  // substrings of the error, besides the path
};

TEST(SafetensorsTest, MalformedFilesAreRejectedWithPreciseErrors) {
  TempDir tmp;
  const std::string data16(16, '\x01');
  const std::vector<BadFile> cases = {
      {"tiny", "abc", {"truncated"}},
      {"header past end",
       RawSafetensors(std::string(40, ' '), "").substr(0, 30),
       {"truncated", "header size 40"}},
      {"not json", RawSafetensors("{\"a\": ", data16), {"not valid JSON"}},
      {"not object", RawSafetensors("[1, 2]  ", data16), {"not a JSON object"}},
      {"offsets past end",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", data16),
       {"tensor 'w'", "'data_offsets'", "outside"}},
      {"reversed offsets",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", data16),
       {"tensor 'w'", "'data_offsets'"}},
      {"size mismatch",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data16),
       {"tensor 'w'", "spans 16 bytes", "needs 12"}},
      {"bf16 size mismatch",
       RawSafetensors(R"({"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,16]}})", data16),
       {"tensor 'w'", "needs 8"}},
      {"unknown dtype",
       RawSafetensors(R"({"w":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,16]}})", data16),
       {"tensor 'w'", "unknown dtype 'Q4_K'"}},
      {"missing dtype",
       RawSafetensors(R"({"w":{"shape":[4],"data_offsets":[0,16]}})", data16),
       {"tensor 'w'", "'dtype'"}},
      {"negative dim",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", data16),
       {"tensor 'w'", "'shape'"}},
      {"string offsets",
       RawSafetensors(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":["0","16"]}})", data16),
       {"tensor 'w'", "'data_offsets'"}},
      {"overflowing shape",
       RawSafetensors(
           R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})",
           data16),
       {"tensor 'w'", "too large"}},
  };
  for (const BadFile& c : cases) {
    const std::string path = tmp.path() + "/bad.safetensors";
    WriteAll(path, c.bytes);
    auto w = OpenSafetensorsFile(path);
    ASSERT_FALSE(w.ok()) << c.what;
    EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(w.status().message(), HasSubstr(path)) << c.what;
    for (const std::string& s : c.expect) {
      EXPECT_THAT(w.status().message(), HasSubstr(s)) << c.what << ": " << w.status();
    }
  }
}

TEST(SafetensorsTest, TruncatedRealFileNamesTheTensor) {
  TempDir tmp;
  std::string bytes = ReadAll(kStories + "/model.safetensors");
  ASSERT_EQ(bytes.size(), 1176144u);
  bytes.resize(bytes.size() - 1000);  // cuts into lm_head.weight, the last tensor
  const std::string path = tmp.path() + "/model.safetensors";
  WriteAll(path, bytes);
  auto w = OpenSafetensors(tmp.path());
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(w.status().message(), HasSubstr(path));
  EXPECT_THAT(w.status().message(), HasSubstr("tensor 'lm_head.weight'"));
  EXPECT_THAT(w.status().message(), HasSubstr("'data_offsets'"));
}

TEST(SafetensorsTest, UnsupportedDTypeIsReportedWhenRead) {
  TempDir tmp;
  const std::string path = tmp.path() + "/q.safetensors";
  WriteAll(path, RawSafetensors(R"({"__metadata__":{"format":"pt"},)"
                                R"("q":{"dtype":"I8","shape":[16],"data_offsets":[0,16]},)"
                                R"("d":{"dtype":"F64","shape":[2],"data_offsets":[16,32]},)"
                                R"("f":{"dtype":"F32","shape":[2],"data_offsets":[32,40]}})",
                                std::string(40, '\0')));
  auto w = OpenSafetensorsFile(path);
  ASSERT_TRUE(w.ok()) << w.status();  // unused tensors may be of any dtype
  EXPECT_TRUE((*w)->Has("q"));
  std::vector<float> buf(16);
  for (const char* name : {"q", "d"}) {
    absl::Status st = (*w)->ReadF32(name, {name[0] == 'q' ? 16 : 2}, buf.data());
    ASSERT_FALSE(st.ok()) << name;
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(st.message(), HasSubstr(path));
    EXPECT_THAT(st.message(), HasSubstr(std::string("tensor '") + name + "'"));
    EXPECT_THAT(st.message(), HasSubstr(name[0] == 'q' ? "I8" : "F64"));
  }
  EXPECT_TRUE((*w)->ReadF32("f", {2}, buf.data()).ok());
}

TEST(SafetensorsTest, UnalignedDataIsReadCorrectly) {
  // A header whose length is not a multiple of 4 leaves float data unaligned.
  TempDir tmp;
  const std::string path = tmp.path() + "/u.safetensors";
  const float vals[3] = {1.5f, -2.25f, 3.0f};
  std::string data(reinterpret_cast<const char*>(vals), sizeof(vals));
  const uint16_t h[2] = {F32ToBf16(0.5f), F32ToBf16(-8.0f)};
  data.append(reinterpret_cast<const char*>(h), sizeof(h));
  std::string header = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
                       R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]}})";
  while ((8 + header.size()) % 4 != 1) header.push_back(' ');
  WriteAll(path, RawSafetensors(header, data));
  auto w = OpenSafetensorsFile(path);
  ASSERT_TRUE(w.ok()) << w.status();
  std::vector<float> a(3), b(2);
  ASSERT_TRUE((*w)->ReadF32("a", {3}, a.data()).ok());
  ASSERT_TRUE((*w)->ReadF32("b", {2}, b.data()).ok());
  EXPECT_THAT(a, ElementsAre(1.5f, -2.25f, 3.0f));
  EXPECT_THAT(b, ElementsAre(0.5f, -8.0f));
}

// ---- InMemoryWeights -------------------------------------------------------------------

TEST(InMemoryWeightsTest, AddGetRead) {
  InMemoryWeights w;
  w.Add("b", {2, 3}, {1, 2, 3, 4, 5, 6});
  w.Add("a", {2}, {7, 8});
  w.Add("bad", {3}, {1, 2});
  EXPECT_TRUE(w.Has("a"));
  EXPECT_FALSE(w.Has("c"));
  EXPECT_THAT(w.Names(), ElementsAre("a", "b", "bad"));
  auto v = w.Get("b");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->dtype, DType::kF32);
  EXPECT_THAT(v->shape, ElementsAre(2, 3));
  EXPECT_EQ(v->nbytes, 24u);
  std::vector<float> out(6);
  ASSERT_TRUE(w.ReadF32("b", {2, 3}, out.data()).ok());
  EXPECT_THAT(out, ElementsAre(1, 2, 3, 4, 5, 6));
  ASSERT_TRUE(w.ReadF32Block("b", {2, 3}, 0, 2, 1, 3, out.data()).ok());
  EXPECT_THAT(std::vector<float>(out.begin(), out.begin() + 4), ElementsAre(2, 3, 5, 6));
  absl::Status st = w.ReadF32("b", {3, 2}, out.data());
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.message(), HasSubstr("tensor 'b': expected shape [3, 2], got [2, 3]"));
  EXPECT_EQ(w.Get("c").status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(w.Get("bad").ok());  // 2 values for 3 elements
}

// ---- dtype conversions -----------------------------------------------------------------

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(F32ToBf16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToBf16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToBf16(FromBits(0x3F808000)), 0x3F80);  // tie, even below: down
  EXPECT_EQ(F32ToBf16(FromBits(0x3F818000)), 0x3F82);  // tie, odd below: up
  EXPECT_EQ(F32ToBf16(FromBits(0x3F808001)), 0x3F81);  // above the tie: up
  EXPECT_EQ(F32ToBf16(FromBits(0x3F807FFF)), 0x3F80);  // below the tie: down
  EXPECT_EQ(F32ToBf16(FromBits(0x3F80FFFF)), 0x3F81);
  EXPECT_EQ(F32ToBf16(FromBits(0x3FFFFFFF)), 0x4000);  // carries into the exponent
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(F32ToBf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds to inf
  EXPECT_EQ(F32ToBf16(FromBits(0x00000001)), 0x0000);               // tiny denormal
  // NaN stays NaN, even when only low mantissa bits are set (naive rounding would
  // carry them away and produce inf), and keeps its sign.
  for (uint32_t nan : {0x7FC00000u, 0x7F800001u, 0x7F80FFFFu, 0xFFC00000u, 0xFF800001u}) {
    const uint16_t h = F32ToBf16(FromBits(nan));
    EXPECT_TRUE(std::isnan(Bf16ToF32(h))) << std::hex << nan;
    EXPECT_EQ(h & 0x8000, (nan >> 16) & 0x8000);
  }
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
  // Every bf16 value converts exactly.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToF32(static_cast<uint16_t>(h));
    ASSERT_EQ(Bits(f), h << 16);
    if (!std::isnan(f)) {
      ASSERT_EQ(F32ToBf16(f), h);
    }
  }
}

// Reference fp16 rounding in double arithmetic.
uint16_t RefF32ToF16(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (std::isnan(f)) return sign | 0x7E00;
  if (a >= 65520.0) return sign | 0x7C00;
  if (a < std::ldexp(1.0, -14)) {
    return sign | static_cast<uint16_t>(std::nearbyint(a * std::ldexp(1.0, 24)));
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  const double ulp = std::ldexp(1.0, e - 11);
  const double q = std::nearbyint(a / ulp) * ulp;  // round half to even
  int e2;
  const double m2 = std::frexp(q, &e2);
  const int exp = e2 - 1 + 15;
  const uint32_t mant = static_cast<uint32_t>((m2 * 2 - 1) * 1024);
  if (exp >= 31) return sign | 0x7C00;
  return static_cast<uint16_t>(sign | (exp << 10) | mant);
}

TEST(DTypeTest, F16Conversions) {
  EXPECT_EQ(F32ToF16(1.0f), 0x3C00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7BFF);
  EXPECT_EQ(F32ToF16(65519.0f), 0x7BFF);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7C00);
  EXPECT_EQ(F32ToF16(1e10f), 0x7C00);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);         // smallest subnormal
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);         // tie to even: 0
  EXPECT_EQ(F32ToF16(std::ldexp(3.0f, -25)), 0x0002);         // tie to even: 2
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14)), 0x0400);         // smallest normal
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);  // tie: even
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(3.0f, -11)), 0x3C02);  // tie: even
  EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(F16ToF32(F32ToF16(FromBits(0x7F800001)))));
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);

  // Every half converts exactly to float and back.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    double ref;
    if (exp == 0) {
      ref = std::ldexp(static_cast<double>(mant), -24);
    } else if (exp == 31) {
      ref = mant == 0 ? INFINITY : NAN;
    } else {
      ref = std::ldexp(1.0 + mant / 1024.0, static_cast<int>(exp) - 15);
    }
    if (h & 0x8000) ref = -ref;
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(f)) << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << h;
    ASSERT_EQ(F32ToF16(f), h) << h;
  }
  // Random floats over the whole range, and near the subnormal boundary, round like
  // the double-precision reference.
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = rng();
    float f = FromBits(bits);
    if (i % 2 == 0) f = FromBits((bits & 0x807FFFFF) | ((0x66 + (bits >> 28)) << 23));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToF16(f), RefF32ToF16(f)) << std::hex << Bits(f);
  }
}

TEST(DTypeTest, BulkConversionsMatchScalar) {
  std::vector<float> src = TestValues(1000, 9);
  src.push_back(NAN);
  src.push_back(INFINITY);
  src.push_back(1e-6f);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<uint8_t> raw(src.size() * DTypeSize(dt) + 1);
    ConvertFromF32(dt, src.data(), static_cast<int64_t>(src.size()), raw.data() + 1);  // unaligned
    std::vector<float> back(src.size());
    ConvertToF32(dt, raw.data() + 1, static_cast<int64_t>(src.size()), back.data());
    for (size_t i = 0; i < src.size(); ++i) {
      float expect = src[i];
      if (dt == DType::kBF16) expect = Bf16ToF32(F32ToBf16(src[i]));
      if (dt == DType::kF16) expect = F16ToF32(F32ToF16(src[i]));
      if (std::isnan(expect)) {
        ASSERT_TRUE(std::isnan(back[i]));
      } else {
        ASSERT_EQ(back[i], expect) << i;
      }
    }
  }
}

}  // namespace
}  // namespace superpose::engine
