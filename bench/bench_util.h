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

inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace superpose::bench
