// Helpers shared by the benchmarks: timing, the memory-bandwidth probe, tables.
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace superpose::bench {

inline double NowS() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Copy bandwidth in bytes copied per second (each byte is read once and written once),
// best of `reps` passes over buffers much larger than the caches, every OpenMP thread
// copying its own slice.
inline double CopyBandwidth(size_t bytes = size_t{512} << 20, int reps = 5) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowS();
#pragma omp parallel
    {
      const size_t n = static_cast<size_t>(omp_get_num_threads());
      const size_t i = static_cast<size_t>(omp_get_thread_num());
      const size_t chunk = (bytes + n - 1) / n;
      const size_t begin = std::min(bytes, i * chunk), end = std::min(bytes, begin + chunk);
      std::memcpy(b.data() + begin, a.data() + begin, end - begin);
    }
    const double t = NowS() - t0;
    best = std::min(best, t);
    a[r] = b[bytes - 1 - r];  // keep the copies observable
  }
  return static_cast<double>(bytes) / best;
}

// Read-only bandwidth in bytes per second: every OpenMP thread sums its slice of a
// buffer much larger than the caches (vectorised, 4 independent sums), best of `reps`.
inline double ReadBandwidth(size_t bytes = size_t{512} << 20, int reps = 5) {
  std::vector<float> a(bytes / sizeof(float), 1.0f);
  double best = 1e30, sink = 0;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowS();
    double total = 0;
#pragma omp parallel reduction(+ : total)
    {
      const size_t n = static_cast<size_t>(omp_get_num_threads());
      const size_t i = static_cast<size_t>(omp_get_thread_num());
      const size_t chunk = (a.size() + n - 1) / n;
      const size_t begin = std::min(a.size(), i * chunk), end = std::min(a.size(), begin + chunk);
      float s[16] = {};
      size_t k = begin;
      for (; k + 16 <= end; k += 16) {
#pragma omp simd
        for (int l = 0; l < 16; ++l) s[l] += a[k + l];
      }
      for (int l = 0; l < 16; ++l) total += s[l];
    }
    best = std::min(best, NowS() - t0);
    sink += total;
  }
  if (sink == -1) std::printf(" ");  // keep the sums observable
  return static_cast<double>(bytes) / best;
}

// The CPU's model name from /proc/cpuinfo ("?" when unknown).
inline std::string CpuModel() {
  FILE* f = std::fopen("/proc/cpuinfo", "r");
  if (f == nullptr) return "?";
  char line[512];
  std::string model = "?";
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, "model name", 10) == 0 || std::strncmp(line, "CPU part", 8) == 0) {
      const char* colon = std::strchr(line, ':');
      if (colon != nullptr) {
        model = colon + 2;
        while (!model.empty() && (model.back() == '\n' || model.back() == ' ')) model.pop_back();
      }
      break;
    }
  }
  std::fclose(f);
  return model;
}

inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace superpose::bench
