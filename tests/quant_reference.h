// The float64 reference of a dequantizing GEMM, y[t, r] = sum_c W'[r, c] x[t, c] with
// W' dequantized [out, in] and x bf16 [T, in], for the CUDA quantized kernels' tests (on
// CPU threads and on the GPU): each output within tol * sum_c |W'[r, c] x[t, c]|; the
// first 5 misses are reported with `what`.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "engine/model/weights.h"

namespace superpose::testing {

inline void ExpectNearQuantReference(const std::vector<float>& dequant, int32_t out, int32_t in,
                                     const std::vector<uint16_t>& x, int32_t T,
                                     const std::vector<float>& y, double tol,
                                     const std::string& what) {
  int bad = 0;
  for (int32_t t = 0; t < T && bad < 5; ++t) {
    for (int32_t r = 0; r < out && bad < 5; ++r) {
      double ref = 0.0, mag = 0.0;
      for (int32_t c = 0; c < in; ++c) {
        const double p = static_cast<double>(dequant[static_cast<size_t>(r) * in + c]) *
                         engine::Bf16ToF32(x[static_cast<size_t>(t) * in + c]);
        ref += p;
        mag += std::fabs(p);
      }
      const double got = y[static_cast<size_t>(t) * out + r];
      if (!(std::fabs(got - ref) <= tol * mag + 1e-30)) {
        ++bad;
        ADD_FAILURE() << what << " t=" << t << " r=" << r << ": " << got << " vs " << ref
                      << " (sum |w x| " << mag << ")";
      }
    }
  }
}

}  // namespace superpose::testing
