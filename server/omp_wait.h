// How idle OpenMP workers wait. libgomp's default lets a worker spin 300000 iterations
// of its wait loop (about 4.6 ms on the dev Xeon) after each parallel region before it
// sleeps. When other processes keep the cores busy, those spinning workers take the time
// slices the thread they wait for needs: a small request took seconds instead of ~70 ms.
// Passive waiting (sleep at once) fixes that but pays a wake-up per parallel region:
// batch-1 decode 25-48% slower on an idle machine. The default here is a bounded spin of
// about kSpinTargetNs (GOMP_SPINCOUNT calibrated to this CPU: the loop's speed varies with
// the `pause` instruction: ~15 ns on the dev Xeon, from a few to ~50 ns elsewhere). Measurements:
// docs/operations.md.
//
// libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when the library loads (before
// main), so a setenv() in main is too late: the program re-executes itself once with the
// variable set, unless the user set either variable (then theirs is kept).
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace superpose::omp_wait {

// How long an idle worker spins before it sleeps.
inline constexpr double kSpinTargetNs = 50'000;
// Set in the re-executed process: tells our default apart from a user's setting (log).
inline constexpr const char* kMarker = "SUPERPOSE_OMP_WAIT_DEFAULT";

// Nanoseconds per iteration of libgomp's spin loop (a relaxed load, then cpu_relax: x86
// `pause`, AArch64 `yield`, elsewhere a compiler barrier) on this CPU: the fastest of a few short
// timings, so that a timing the scheduler interrupted does not count.
inline double SpinIterationNs() {
  static std::atomic<int> flag{0};
  constexpr int kIters = 2000;
  double best = 1e9;
  for (int rep = 0; rep < 8; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kIters; ++i) {
      if (flag.load(std::memory_order_relaxed) != 0) break;
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#elif defined(__aarch64__)
      __asm__ volatile("yield" : : : "memory");
#else
      __asm__ volatile("" : : : "memory");
#endif
    }
    const double ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ns / kIters);
  }
  return best;
}

// The GOMP_SPINCOUNT of our default: about kSpinTargetNs of spinning, within [1000,
// 300000] (libgomp's own default is the upper end).
inline int64_t DefaultSpinCount() {
  const double ns = std::max(SpinIterationNs(), 0.1);
  return std::clamp(static_cast<int64_t>(kSpinTargetNs / ns), int64_t{1000}, int64_t{300000});
}

// What the process runs with, for the startup log: "spincount:3200(default)",
// "passive(env)", "active,spincount:5(env)", or "libgomp" (libgomp's own default: the
// re-exec failed).
inline std::string Describe() {
  const char* policy = std::getenv("OMP_WAIT_POLICY");
  const char* spin = std::getenv("GOMP_SPINCOUNT");
  std::string s;
  if (policy != nullptr) s += policy;
  if (spin != nullptr) s += std::string(s.empty() ? "" : ",") + "spincount:" + spin;
  if (s.empty()) return "libgomp";
  return s + (std::getenv(kMarker) != nullptr ? "(default)" : "(env)");
}

// Call first thing in main(): unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT,
// sets our default and returns true; the caller then re-executes the program
// (ExecSelf), after any other setup that may re-execute it with this environment
// (EnsureBlasCoreType), so that one exec carries both. In the re-executed process the
// variable is set, so it returns false: no loop.
inline bool SetDefault() {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr || std::getenv("GOMP_SPINCOUNT") != nullptr) {
    return false;  // the user's choice, or ours after the re-exec
  }
  setenv("GOMP_SPINCOUNT", std::to_string(DefaultSpinCount()).c_str(), 1);
  setenv(kMarker, "1", 1);
  return true;
}

// Re-executes the program with the environment SetDefault() set. If the exec fails,
// undoes it (the log then says libgomp's default is in force) and returns.
inline void ExecSelf(char** argv) {
  execv("/proc/self/exe", argv);
  unsetenv("GOMP_SPINCOUNT");
  unsetenv(kMarker);
}

}  // namespace superpose::omp_wait
