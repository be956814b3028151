// The CUDA backend's quantized projections (--cuda_dtype=int8|q4; cuda/cuda_quant.h,
// cuda/quant_kernels.h). Option parsing and the format choice run in every CUDA build;
// the rest skips (GTEST_SKIP with the reason) without a usable GPU, and
// tests/quant_emulation_test.cc checks the same kernel bodies on CPU threads.
//
// Tolerances (x bf16, W' the dequantized weights, S = sum_c |W'[r, c] x[t, c]|):
//   streaming kernel (T <= 16)  within (in / 32 + 8) * 2^-24 * S of a float64 reference
//                               (float32 sums of exact products of exact weights)
//   prefill path (T > 16)       within 2^-8 * S (W' rounded to bf16, then cuBLAS)
//   stories260k int8            the golden greedy tokens for at least the first 16
//                               tokens of every case (the CPU int8 backend's bound,
//                               tests/quant_model_test.cc), graphs on and off equal
//   load-time int8              bitwise the logits of the converted checkpoint
//   untied int8 LM head         vs the CPU int8 backend on the same codes: every logit
//                               within 0.05 * max|logit| of its row (bf16 activations
//                               and K/V on the GPU, as cuda_backend_test's bound)
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/quant_gemm.h"
#include "engine/model/quant_checkpoint.h"
#include "engine/model/quantize.h"
#include "engine/model/weights.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/quant_reference.h"
#include "tests/test_util.h"

#if SUPERPOSE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/cuda_options.h"
#include "cuda/cuda_quant.h"
#include "cuda/cuda_util.h"
#endif

namespace superpose {
namespace {

#if SUPERPOSE_HAVE_CUDA

namespace fs = std::filesystem;
using engine::WeightQuant;

// More than kQuantStreamMaxT tokens: its prefill takes the bf16-scratch path.
constexpr char kLongPrompt[] =
    "Once upon a time, there was a little dog named Max. Max liked to run in the big "
    "green park near his house.";

TEST(CudaQuantOptions, ParsesCudaDtype) {
  auto o = cuda::ParseCudaOptions({});
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->dtype, cuda::CudaDType::kAuto);
  for (const auto& [name, want] :
       {std::pair{"auto", cuda::CudaDType::kAuto}, std::pair{"bf16", cuda::CudaDType::kBf16},
        std::pair{"bfloat16", cuda::CudaDType::kBf16}, std::pair{"int8", cuda::CudaDType::kInt8},
        std::pair{"q4", cuda::CudaDType::kQ4}}) {
    o = cuda::ParseCudaOptions({{"cuda_dtype", name}});
    ASSERT_TRUE(o.ok()) << name;
    EXPECT_EQ(o->dtype, want) << name;
  }
  o = cuda::ParseCudaOptions({{"cuda_dtype", "int4"}});
  EXPECT_EQ(o.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(o.status().message().find("cuda_dtype"), std::string::npos) << o.status();
}

TEST(CudaQuantOptions, ChoosesTheCheckpointsFormatOrRefusesAnother) {
  using cuda::CudaDType;
  EXPECT_EQ(*cuda::ChooseCudaQuant(CudaDType::kAuto, WeightQuant::kNone), WeightQuant::kNone);
  EXPECT_EQ(*cuda::ChooseCudaQuant(CudaDType::kAuto, WeightQuant::kQ4), WeightQuant::kQ4);
  EXPECT_EQ(*cuda::ChooseCudaQuant(CudaDType::kBf16, WeightQuant::kInt8), WeightQuant::kNone);
  EXPECT_EQ(*cuda::ChooseCudaQuant(CudaDType::kInt8, WeightQuant::kNone), WeightQuant::kInt8);
  EXPECT_EQ(*cuda::ChooseCudaQuant(CudaDType::kQ4, WeightQuant::kQ4), WeightQuant::kQ4);
  auto bad = cuda::ChooseCudaQuant(CudaDType::kQ4, WeightQuant::kInt8);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("--cuda_dtype=q4"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("already quantized (int8)"), std::string::npos);
}

#endif  // SUPERPOSE_HAVE_CUDA

class CudaQuantTest : public ::testing::Test {
 protected:
  void SetUp() override {
#if SUPERPOSE_HAVE_CUDA
    std::string why;
    if (!cuda::CudaAvailable(&why)) GTEST_SKIP() << "no usable CUDA device: " << why;
#else
    GTEST_SKIP() << "built without CUDA (SUPERPOSE_HAVE_CUDA is off)";
#endif
  }
};

#if SUPERPOSE_HAVE_CUDA

std::vector<float> Uniform(size_t n, uint32_t seed, float a) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-a, a);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// A QuantMatrix of `tensors` random [out, in] tensors fused by rows, and its dequantized
// values.
struct Matrix {
  engine::cpu::QuantMatrix m;
  std::vector<float> dequant;
};

Matrix RandomMatrix(WeightQuant kind, int32_t out, int32_t in, int tensors, uint32_t seed) {
  Matrix r;
  for (int k = 0; k < tensors; ++k) {
    const std::vector<float> w = Uniform(static_cast<size_t>(out) * in, seed + k, 0.5f);
    const engine::QuantizedTensor t = engine::Quantize(kind, w.data(), out, in);
    EXPECT_TRUE(r.m.AppendBlock(t, 0, out, 0, in).ok());
    std::vector<float> d(w.size());
    engine::DequantizeRows(t, 0, out, d.data());
    r.dequant.insert(r.dequant.end(), d.begin(), d.end());
  }
  return r;
}

// y = x * W'^T on the device through cuda::QuantProject with `scratch_rows` rows of
// scratch.
std::vector<float> DeviceProject(const engine::cpu::QuantMatrix& m, const std::vector<uint16_t>& x,
                                 int32_t T, int32_t scratch_rows) {
  cuda::DeviceQuant w;
  EXPECT_TRUE(cuda::UploadQuant(m, &w).ok());
  cuda::DeviceArray<uint16_t> dx;
  cuda::DeviceArray<float> dy;
  cuda::DeviceArray<cuda::bf16> scratch;
  EXPECT_TRUE(dx.Allocate(x.size()).ok());
  EXPECT_TRUE(dy.Allocate(static_cast<size_t>(T) * m.out).ok());
  EXPECT_TRUE(scratch.Allocate(static_cast<size_t>(scratch_rows) * m.in).ok());
  EXPECT_EQ(cudaMemcpy(dx.get(), x.data(), x.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
  EXPECT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  EXPECT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasSetStream(handle, stream), CUBLAS_STATUS_SUCCESS);
  const absl::Status st =
      cuda::QuantProject(handle, stream, reinterpret_cast<const cuda::bf16*>(dx.get()), T, w,
                         scratch.get(), scratch.size(), dy.get());
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  std::vector<float> y(static_cast<size_t>(T) * m.out);
  EXPECT_EQ(cudaMemcpy(y.data(), dy.get(), y.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return y;
}

TEST_F(CudaQuantTest, KernelsMatchTheCpuReference) {
  struct Shape {
    int32_t out, in, tensors;
  };
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    // Wide loads (cuda::QuantVectorizable): int8 at 16, 100 and 512 columns, q4 at 16 and
    // 512; byte-wise at 530 and 45.
    for (Shape sh : {Shape{9, 16, 1}, Shape{67, 100, 1}, Shape{256, 530, 1}, Shape{24, 45, 3},
                     Shape{40, 512, 2}}) {
      const Matrix mat = RandomMatrix(kind, sh.out, sh.in, sh.tensors, 40 + sh.in);
      const int32_t out = mat.m.out, in = sh.in;
      for (int32_t T : {1, 3, 16, 17, 40}) {
        std::vector<uint16_t> x(static_cast<size_t>(T) * in);
        const std::vector<float> xf = Uniform(x.size(), 7 + T, 1.0f);
        for (size_t i = 0; i < x.size(); ++i) x[i] = engine::F32ToBf16(xf[i]);
        const double tol = T <= cuda::kQuantStreamMaxT ? (in / 32.0 + 8.0) * std::ldexp(1.0, -24)
                                                       : std::ldexp(1.0, -8);
        const std::vector<float> y = DeviceProject(mat.m, x, T, 7);  // chunks of 7 rows
        testing::ExpectNearQuantReference(
            mat.dequant, out, in, x, T, y, tol,
            absl::StrCat(engine::WeightQuantName(kind), " ", out, "x", in, " T=", T));
      }
    }
  }
}

class CudaQuantModelTest : public CudaQuantTest {
 protected:
  static void SetUpTestSuite() {
    root_ = new std::string(fs::temp_directory_path() /
                            ("superpose-cuda-quant-test-" + std::to_string(::getpid())));
    if (!cuda::CudaAvailable()) return;  // every test skips
    for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
      auto s = engine::QuantizeCheckpoint(testing::Stories260kDir(), Dir(kind), kind);
      ASSERT_TRUE(s.ok()) << s.status();
    }
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*root_, ec);
    delete root_;
  }
  static std::string Dir(WeightQuant kind) { return *root_ + "/" + engine::WeightQuantName(kind); }
  static engine::ModelBundle Bundle(const std::string& dir) {
    auto b = engine::LoadModelBundle(dir);
    EXPECT_TRUE(b.ok()) << b.status();
    return b.ok() ? std::move(*b) : engine::ModelBundle{};
  }
  static std::unique_ptr<cuda::CudaBackend> Gpu(const engine::ModelBundle& m, cuda::CudaDType dtype,
                                                bool graphs, absl::Status* st) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 64;
    cuda::CudaOptions copts;
    copts.graphs = graphs;
    copts.dtype = dtype;
    auto gpu = std::make_unique<cuda::CudaBackend>(opts, copts, 0);
    *st = gpu->Load(m.config, *m.weights, engine::Shard{});
    return gpu;
  }
  static std::string* root_;
};
std::string* CudaQuantModelTest::root_ = nullptr;

// Greedy tokens of every golden case through the engine.
std::vector<std::vector<int32_t>> GoldenRuns(const engine::ModelBundle& m, engine::Backend& b) {
  const nlohmann::json golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  engine::Engine eng(engine::EngineOptions{}, m.config, m.tokenizer.get(), &b);
  eng.Start();
  std::vector<std::vector<int32_t>> out;
  for (const auto& c : golden["generation"]) {
    auto r = testing::RunRequest(eng, testing::GreedyRequest(c["prompt_ids"], 64));
    EXPECT_TRUE(r.status.ok()) << r.status;
    out.push_back(r.tokens);
  }
  eng.Shutdown(absl::Seconds(1));
  EXPECT_EQ(eng.blocks().free_blocks(), eng.blocks().num_blocks());
  return out;
}

TEST_F(CudaQuantModelTest, Int8KeepsTheGoldenGreedyOutputForSixteenTokens) {
  const nlohmann::json golden = testing::ReadJson(testing::Stories260kDir() + "/golden.json");
  const engine::ModelBundle f32 = Bundle(testing::Stories260kDir());
  absl::Status st;
  const int64_t bf16_bytes = Gpu(f32, cuda::CudaDType::kAuto, true, &st)->weight_bytes();
  ASSERT_TRUE(st.ok()) << st;
  for (WeightQuant kind : {WeightQuant::kInt8, WeightQuant::kQ4}) {
    const engine::ModelBundle q = Bundle(Dir(kind));
    std::vector<std::vector<int32_t>> runs[2];
    for (bool graphs : {false, true}) {
      auto gpu = Gpu(q, cuda::CudaDType::kAuto, graphs, &st);
      ASSERT_TRUE(st.ok()) << st;
      EXPECT_EQ(gpu->compute_dtype(), engine::WeightQuantName(kind));
      EXPECT_LT(gpu->weight_bytes(), bf16_bytes);
      runs[graphs] = GoldenRuns(q, *gpu);
      if (graphs) {
        EXPECT_GT(gpu->graph_stats().replays, 0);
      }
    }
    EXPECT_EQ(runs[true], runs[false]) << "CUDA graphs changed the greedy tokens";
    size_t i = 0;
    for (const auto& c : golden["generation"]) {
      const auto want = c["completion_ids"].get<std::vector<int32_t>>();
      const std::vector<int32_t>& got = runs[false][i++];
      size_t n = 0;
      while (n < got.size() && n < want.size() && got[n] == want[n]) ++n;
      std::printf("[ cuda quant ] %s golden case %zu: first %zu of %zu greedy tokens equal\n",
                  engine::WeightQuantName(kind), i - 1, n, want.size());
      if (kind == WeightQuant::kInt8) {
        EXPECT_GE(n, 16u) << "case " << i - 1;
      }
    }
  }
}

TEST_F(CudaQuantModelTest, LoadTimeInt8EqualsTheConvertedCheckpoint) {
  const engine::ModelBundle f32 = Bundle(testing::Stories260kDir());
  const engine::ModelBundle q = Bundle(Dir(WeightQuant::kInt8));
  absl::Status st;
  auto converted = Gpu(q, cuda::CudaDType::kAuto, false, &st);
  ASSERT_TRUE(st.ok()) << st;
  auto at_load = Gpu(f32, cuda::CudaDType::kInt8, false, &st);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(at_load->compute_dtype(), "int8");
  // A prefill of more than kQuantStreamMaxT tokens (bf16 scratch and cuBLAS), then
  // decode steps (the streaming kernel).
  const std::vector<int32_t> prompt = q.tokenizer->Encode(kLongPrompt, true);
  ASSERT_GT(prompt.size(), static_cast<size_t>(cuda::kQuantStreamMaxT));
  const auto want = testing::RunSteps(*converted, prompt, 20);
  EXPECT_EQ(testing::RunSteps(*at_load, prompt, 20), want);
  // bf16 asked of the quantized checkpoint: its dequantized values, in bf16.
  auto as_bf16 = Gpu(q, cuda::CudaDType::kBf16, false, &st);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(as_bf16->compute_dtype(), "bfloat16");
}

TEST_F(CudaQuantModelTest, AnotherFormatIsRefusedAndTheDeviceStaysUsable) {
  const engine::ModelBundle q = Bundle(Dir(WeightQuant::kInt8));
  absl::Status st;
  auto gpu = Gpu(q, cuda::CudaDType::kQ4, false, &st);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(st.message().find("--cuda_dtype=q4"), std::string::npos) << st;
  EXPECT_TRUE(gpu->Health().ok());
  auto ok = Gpu(q, cuda::CudaDType::kAuto, false, &st);
  EXPECT_TRUE(st.ok()) << st;
}

// stories260k untied (lm_head.weight = the embedding, in memory): the head is quantized
// too, on the GPU and on the CPU, from the same codes.
TEST_F(CudaQuantModelTest, QuantizedUntiedHeadMatchesTheCpuBackend) {
  const engine::ModelBundle f32 = Bundle(testing::Stories260kDir());
  auto w = std::make_unique<engine::InMemoryWeights>();
  for (const std::string& name : f32.weights->Names()) {
    auto tv = f32.weights->Get(name);
    ASSERT_TRUE(tv.ok()) << name;
    std::vector<float> f(static_cast<size_t>(tv->numel()));
    ASSERT_TRUE(f32.weights->ReadF32(name, tv->shape, f.data()).ok()) << name;
    if (name == "model.embed_tokens.weight") w->Add("lm_head.weight", tv->shape, f);
    w->Add(name, tv->shape, std::move(f));
  }
  engine::ModelConfig config = f32.config;
  config.tie_word_embeddings = false;
  engine::BackendOptions opts;
  opts.kv_num_blocks = 64;
  engine::cpu::CpuOptions cpu_opts;
  cpu_opts.dtype = engine::cpu::WeightDType::kInt8;
  auto cpu = engine::cpu::MakeCpuBackend(opts, cpu_opts);
  ASSERT_TRUE(cpu->Load(config, *w, engine::Shard{}).ok());
  cuda::CudaOptions copts;
  copts.dtype = cuda::CudaDType::kInt8;
  cuda::CudaBackend gpu(opts, copts, 0);
  const absl::Status st = gpu.Load(config, *w, engine::Shard{});
  ASSERT_TRUE(st.ok()) << st;
  const std::vector<int32_t> prompt = f32.tokenizer->Encode(kLongPrompt, true);
  ASSERT_GT(prompt.size(), static_cast<size_t>(cuda::kQuantStreamMaxT));
  const auto want = testing::RunSteps(*cpu, prompt, 12);
  std::vector<int32_t> forced;
  for (const auto& row : want) {
    forced.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  const auto got = testing::RunSteps(gpu, prompt, 12, &forced);
  ASSERT_EQ(got.size(), want.size());
  for (size_t s = 0; s < want.size(); ++s) {
    ASSERT_EQ(got[s].size(), want[s].size());
    float mx = 0.0f;
    for (float v : want[s]) mx = std::max(mx, std::fabs(v));
    for (size_t v = 0; v < want[s].size(); ++v) {
      ASSERT_NEAR(got[s][v], want[s][v], 0.05f * mx) << "step " << s << " token " << v;
    }
  }
}

#endif  // SUPERPOSE_HAVE_CUDA

}  // namespace
}  // namespace superpose
