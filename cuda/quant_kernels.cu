// The dequantizing GEMM kernels (cuda/quant_kernels.h): thin wrappers around the bodies
// of cuda/quant_body.h, which tests/quant_emulation_test.cc also runs on CPU threads.
#include "cuda/quant_kernels.h"

namespace superpose::cuda {
namespace {

constexpr int kGemvWarps = 4;  // output rows per block of the streaming kernel
constexpr int kDequantThreads = 256;

// The streaming body's warp: lane index and xor-shuffle sums.
struct DeviceWarp {
  int l;
  __device__ int lane() const { return l; }
  template <int N>
  __device__ void sum(float (&v)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int o = kQuantWarp / 2; o > 0; o >>= 1) v[i] += __shfl_xor_sync(0xFFFFFFFFu, v[i], o);
    }
  }
};

// Block: kGemvWarps warps, one output row each; grid.y: tiles of kMaxT tokens.
template <int kMaxT>
__global__ void __launch_bounds__(kGemvWarps* kQuantWarp)
    QuantGemvKernel(QuantView w, const uint16_t* x, int32_t T, float* y) {
  const int32_t r = static_cast<int32_t>(blockIdx.x) * kGemvWarps +
                    static_cast<int32_t>(threadIdx.x) / kQuantWarp;
  if (r >= w.out) return;  // a whole warp at once
  const int32_t t0 = static_cast<int32_t>(blockIdx.y) * kMaxT;
  const int32_t nt = T - t0 < kMaxT ? T - t0 : kMaxT;
  DeviceWarp wp{static_cast<int>(threadIdx.x) % kQuantWarp};
  QuantGemvWarp<kMaxT>(wp, w, x, t0, nt, r, y);
}

template <int kMaxT>
cudaError_t LaunchGemv(const QuantView& w, const uint16_t* x, int32_t T, float* y,
                       cudaStream_t stream) {
  const dim3 grid((w.out + kGemvWarps - 1) / kGemvWarps, (T + kMaxT - 1) / kMaxT);
  QuantGemvKernel<kMaxT><<<grid, kGemvWarps * kQuantWarp, 0, stream>>>(w, x, T, y);
  return cudaGetLastError();
}

__global__ void QuantDequantKernel(QuantView w, int32_t r0, int64_t n, uint16_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int32_t r = r0 + static_cast<int32_t>(i / w.in), c = static_cast<int32_t>(i % w.in);
    out[i] = QuantDequantBf16(w, r, c);
  }
}

__global__ void QuantFillKernel(uint8_t* p, int64_t n, uint64_t seed) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    const uint8_t b = static_cast<uint8_t>(z >> 56);
    p[i] = b == 0x80 ? 0x81 : b;
  }
}

int32_t GridFor(int64_t n) {
  const int64_t blocks = (n + kDequantThreads - 1) / kDequantThreads;
  return static_cast<int32_t>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace

cudaError_t LaunchQuantGemv(const QuantView& w, const __nv_bfloat16* x, int32_t T, float* y,
                            cudaStream_t stream) {
  if (T <= 0 || w.out <= 0) return cudaSuccess;
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  QuantView v = w;
  v.vec = QuantVectorizable(w, x) ? 1 : 0;
  if (T == 1) return LaunchGemv<1>(v, xb, T, y, stream);
  if (T <= 4) return LaunchGemv<4>(v, xb, T, y, stream);
  if (T <= 8) return LaunchGemv<8>(v, xb, T, y, stream);
  return LaunchGemv<kQuantStreamMaxT>(v, xb, T, y, stream);
}

cudaError_t LaunchQuantDequantBf16(const QuantView& w, int32_t r0, int32_t r1, __nv_bfloat16* out,
                                   cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(r1 - r0) * w.in;
  if (n <= 0) return cudaSuccess;
  QuantDequantKernel<<<GridFor(n), kDequantThreads, 0, stream>>>(w, r0, n,
                                                                 reinterpret_cast<uint16_t*>(out));
  return cudaGetLastError();
}

cudaError_t LaunchQuantFillRandom(uint8_t* codes, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  QuantFillKernel<<<GridFor(n), kDequantThreads, 0, stream>>>(codes, n, seed);
  return cudaGetLastError();
}

cudaError_t LoadQuantKernels() {
  const void* kernels[] = {reinterpret_cast<const void*>(QuantGemvKernel<1>),
                           reinterpret_cast<const void*>(QuantGemvKernel<4>),
                           reinterpret_cast<const void*>(QuantGemvKernel<8>),
                           reinterpret_cast<const void*>(QuantGemvKernel<kQuantStreamMaxT>),
                           reinterpret_cast<const void*>(QuantDequantKernel),
                           reinterpret_cast<const void*>(QuantFillKernel)};
  for (const void* k : kernels) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, k);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace superpose::cuda
