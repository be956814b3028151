// Loading the CPU backend starts no thread on the loading thread. The server loads on
// its main thread and runs every Forward on the engine's thread: an OpenMP pool left on
// the loading thread (a `#pragma omp parallel` in weight packing) made libgomp manage more
// threads than there are cores, so it cut every worker's spin-wait to ~100 iterations and
// each parallel region of a step paid a futex wake-up: served bf16 decode ran at half the
// engine's speed (docs/benchmarks.md, issue 12). Forward's own pool is expected.
#include <gtest/gtest.h>
#include <omp.h>

#include <filesystem>
#include <string>

#include "engine/cpu/cpu_backend.h"
#include "engine/runtime/model_bundle.h"

namespace superpose {
namespace {

int ThreadCount() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

TEST(CpuLoadThreadsTest, LoadStartsNoThreadOnTheLoadingThread) {
  auto model = engine::LoadModelBundle("");  // the embedded default model
  ASSERT_TRUE(model.ok()) << model.status();
  // With the bug, any parallel region here would start a worker even on a 1-core runner.
  omp_set_num_threads(2);
  for (const std::string dtype : {"float32", "bfloat16", "int8", "q4"}) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 8;
    opts.num_threads = 2;
    auto cpu = engine::cpu::ParseCpuOptions({{"cpu_dtype", dtype}});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    const int before = ThreadCount();
    auto backend = engine::cpu::MakeCpuBackend(opts, *cpu);
    const absl::Status st = backend->Load(model->config, *model->weights, engine::Shard{});
    ASSERT_TRUE(st.ok()) << dtype << ": " << st;
    EXPECT_EQ(ThreadCount(), before) << dtype << ": Load left threads behind";
  }
}

}  // namespace
}  // namespace superpose
