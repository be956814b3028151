// Helpers shared by the benchmarks: timing, the memory-bandwidth probe, tables.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace superpose::bench {

inline double NowS() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Copy bandwidth in bytes/s, STREAM convention (bytes read + bytes written), best of
// `reps` memcpy passes over buffers much larger than the caches.
inline double CopyBandwidth(size_t bytes = size_t{256} << 20, int reps = 5) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = NowS();
    std::memcpy(b.data(), a.data(), bytes);
    const double t = NowS() - t0;
    best = std::min(best, t);
    a[r] = b[bytes - 1 - r];  // keep the copies observable
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * (v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace superpose::bench
