// The CUDA backend's own kernels (see kernels.h for what each computes). Everything
// here is written for correctness first: float32 math, plain loads, no fast-math.
#include <cmath>
#include <map>
#include <mutex>

#include <mma.h>

#include "cuda/attention_body.h"
#include "cuda/attention_tc_body.h"
#include "cuda/sample_body.h"
#include "cuda/top_logits_body.h"
#include "cuda/kernels.h"

namespace superpose::cuda {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float WarpSum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) over the block; `sh` holds 32 floats. Every thread gets the result.
template <bool kMax>
__device__ float BlockReduce(float v, float* sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = kMax ? WarpMax(v) : WarpSum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float r = lane < nwarps ? sh[lane] : (kMax ? -INFINITY : 0.0f);
    r = kMax ? WarpMax(r) : WarpSum(r);
    if (lane == 0) sh[0] = r;
  }
  __syncthreads();
  const float r = sh[0];
  __syncthreads();
  return r;
}

__global__ void EmbeddingKernel(const int32_t* __restrict__ tokens, const bf16* __restrict__ embed,
                                int32_t vocab_begin, int32_t vocab_local, int32_t H,
                                float* __restrict__ x) {
  const int64_t t = blockIdx.x;
  const int32_t id = tokens[t] - vocab_begin;
  float* dst = x + t * H;
  if (id >= 0 && id < vocab_local) {
    const bf16* src = embed + static_cast<int64_t>(id) * H;
    for (int32_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
  } else {
    for (int32_t i = threadIdx.x; i < H; i += blockDim.x) dst[i] = 0.0f;
  }
}

__global__ void AddRmsNormKernel(float* __restrict__ x, const float* __restrict__ add,
                                 const float* __restrict__ w, int32_t H, float eps,
                                 bf16* __restrict__ h) {
  __shared__ float sh[kWarp];
  const int64_t t = blockIdx.x;
  float* xr = x + t * H;
  const float* ar = add != nullptr ? add + t * H : nullptr;
  float ss = 0.0f;
  for (int32_t i = threadIdx.x; i < H; i += blockDim.x) {
    float v = xr[i];
    if (ar != nullptr) {
      v += ar[i];
      xr[i] = v;
    }
    ss += v * v;
  }
  ss = BlockReduce<false>(ss, sh);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(H) + eps);
  bf16* hr = h + t * H;
  // Each thread reads back only the elements it wrote above.
  for (int32_t i = threadIdx.x; i < H; i += blockDim.x)
    hr[i] = __float2bfloat16(xr[i] * inv * w[i]);
}

template <typename T>
__global__ void GatherRowsKernel(const T* __restrict__ in, const int32_t* __restrict__ rows,
                                 int32_t cols, T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const T* src = in + static_cast<int64_t>(rows[r]) * cols;
  T* dst = out + r * cols;
  for (int32_t i = threadIdx.x; i < cols; i += blockDim.x) dst[i] = src[i];
}

// One block per token; each warp takes whole heads (q heads, then k heads, then v heads).
__global__ void QkvPostKernel(const float* __restrict__ qkv, const float* __restrict__ bias,
                              const float* __restrict__ q_norm, const float* __restrict__ k_norm,
                              const float* __restrict__ positions,
                              const float* __restrict__ inv_freq, const int32_t* __restrict__ slots,
                              int32_t qh, int32_t kvh, int32_t D, float eps,
                              float* __restrict__ q_out, bf16* __restrict__ kc,
                              bf16* __restrict__ vc) {
  const int64_t t = blockIdx.x;
  const int32_t heads = qh + 2 * kvh;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  const float* row = qkv + t * heads * D;
  const float pos = positions[t];
  const int32_t half = D / 2;
  const int64_t slot = slots[t];
  for (int32_t hd = warp; hd < heads; hd += nwarps) {  // warp-uniform loop
    const float* src = row + static_cast<int64_t>(hd) * D;
    const float* b = bias != nullptr ? bias + static_cast<int64_t>(hd) * D : nullptr;
    if (hd >= qh + kvh) {
      bf16* dst = vc + (slot * kvh + (hd - qh - kvh)) * D;
      for (int32_t d = lane; d < D; d += kWarp) {
        dst[d] = __float2bfloat16(src[d] + (b != nullptr ? b[d] : 0.0f));
      }
      continue;
    }
    const bool is_q = hd < qh;
    const float* nw = is_q ? q_norm : k_norm;
    float inv = 1.0f;
    if (nw != nullptr) {
      float ss = 0.0f;
      for (int32_t d = lane; d < D; d += kWarp) {
        const float v = src[d] + (b != nullptr ? b[d] : 0.0f);
        ss += v * v;
      }
      ss = WarpSum(ss);
      inv = 1.0f / sqrtf(ss / static_cast<float>(D) + eps);
    }
    for (int32_t i = lane; i < half; i += kWarp) {
      float a = src[i] + (b != nullptr ? b[i] : 0.0f);
      float c2 = src[i + half] + (b != nullptr ? b[i + half] : 0.0f);
      if (nw != nullptr) {
        a = a * inv * nw[i];
        c2 = c2 * inv * nw[i + half];
      }
      float sn, cs;
      sincosf(pos * inv_freq[i], &sn, &cs);
      const float ra = a * cs - c2 * sn;
      const float rb = c2 * cs + a * sn;
      if (is_q) {
        float* dst = q_out + (t * qh + hd) * D;
        dst[i] = ra;
        dst[i + half] = rb;
      } else {
        bf16* dst = kc + (slot * kvh + (hd - qh)) * D;
        dst[i] = __float2bfloat16(ra);
        dst[i + half] = __float2bfloat16(rb);
      }
    }
  }
}

struct DeviceCtx {
  __device__ int tid() const { return threadIdx.x; }
  __device__ int nthreads() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float load(const bf16* p, int64_t i) const { return __bfloat162float(p[i]); }
  __device__ void store(bf16* p, int64_t i, float v) const { p[i] = __float2bfloat16(v); }
};

// grid (num_tiles, kvh); the body is cuda/attention_body.h.
__global__ void __launch_bounds__(kAttnThreads)
    AttentionKernel(const float* __restrict__ q, const bf16* __restrict__ kc,
                    const bf16* __restrict__ vc, const int32_t* __restrict__ keys,
                    const AttnTile* __restrict__ tiles, int32_t qh, int32_t kvh, int32_t D,
                    int32_t G, float scale, bf16* __restrict__ out) {
  extern __shared__ float smem[];
  DeviceCtx c;
  AttentionBlock(c, tiles[blockIdx.x], static_cast<int32_t>(blockIdx.y), smem, q, kc, vc, keys, qh,
                 kvh, D, G, scale, out);
}

// grid (num_tiles, kvh, nsplit): split-K partials; the body is cuda/attention_body.h.
__global__ void __launch_bounds__(kAttnThreads)
    SplitAttentionKernel(const float* __restrict__ q, const bf16* __restrict__ kc,
                         const bf16* __restrict__ vc, const int32_t* __restrict__ keys,
                         const AttnTile* __restrict__ tiles, int32_t qh, int32_t kvh, int32_t D,
                         int32_t G, float scale, int32_t min_keys, size_t stride,
                         float* __restrict__ part) {
  extern __shared__ float smem[];
  DeviceCtx c;
  SplitOut so;
  so.part = part;
  so.tile_index = static_cast<int32_t>(blockIdx.x);
  so.split = static_cast<int32_t>(blockIdx.z);
  so.nsplit = static_cast<int32_t>(gridDim.z);
  so.min_keys = min_keys;
  so.stride = stride;
  AttentionBlock(c, tiles[blockIdx.x], static_cast<int32_t>(blockIdx.y), smem, q, kc, vc, keys, qh,
                 kvh, D, G, scale, static_cast<bf16*>(nullptr), so);
}

// grid (num_tiles, kvh): merges the splits.
__global__ void __launch_bounds__(kAttnThreads)
    CombineAttentionKernel(const AttnTile* __restrict__ tiles, const float* __restrict__ part,
                           int32_t nsplit, size_t stride, int32_t qh, int32_t kvh, int32_t D,
                           int32_t G, bf16* __restrict__ out) {
  DeviceCtx c;
  AttentionCombine(c, tiles[blockIdx.x], static_cast<int32_t>(blockIdx.x),
                   static_cast<int32_t>(blockIdx.y), part, nsplit, stride, qh, kvh, D, G, out);
}

// The warp-matrix API of cuda/attention_tc_body.h on nvcuda::wmma (sm_80+: bf16 inputs,
// float accumulation).
struct WmmaCtx : DeviceCtx {
  using bf16 = ::superpose::cuda::bf16;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                                       nvcuda::wmma::row_major>;
  using FragBc = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                        nvcuda::wmma::col_major>;
  using FragBr = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                                        nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  __device__ int warp() const { return threadIdx.x / kWarp; }
  __device__ int lane() const { return threadIdx.x % kWarp; }
  __device__ void warp_sync() const { __syncwarp(); }
  __device__ bf16 to_bf16(float v) const { return __float2bfloat16(v); }
  __device__ float to_float(bf16 v) const { return __bfloat162float(v); }
  __device__ void copy8(bf16* dst, const bf16* src) const {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
  __device__ void fill_c(FragC& f) const { nvcuda::wmma::fill_fragment(f, 0.0f); }
  __device__ void load_a(FragA& f, const bf16* p, int ldm) const {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ldm));
  }
  __device__ void load_b_col(FragBc& f, const bf16* p, int ldm) const {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ldm));
  }
  __device__ void load_b_row(FragBr& f, const bf16* p, int ldm) const {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ldm));
  }
  __device__ void load_c(FragC& f, const float* p, int ldm) const {
    nvcuda::wmma::load_matrix_sync(f, p, static_cast<unsigned>(ldm), nvcuda::wmma::mem_row_major);
  }
  __device__ void store_c(float* p, const FragC& f, int ldm) const {
    nvcuda::wmma::store_matrix_sync(p, f, static_cast<unsigned>(ldm), nvcuda::wmma::mem_row_major);
  }
  __device__ void mma(FragC& d, const FragA& a, const FragBc& b, const FragC& c) const {
    nvcuda::wmma::mma_sync(d, a, b, c);
  }
  __device__ void mma(FragC& d, const FragA& a, const FragBr& b, const FragC& c) const {
    nvcuda::wmma::mma_sync(d, a, b, c);
  }
};

// grid (num_tiles, kvh), kTcThreads threads; the body is cuda/attention_tc_body.h.
__global__ void __launch_bounds__(kTcThreads)
    TcAttentionKernel(const float* __restrict__ q, const bf16* __restrict__ kc,
                      const bf16* __restrict__ vc, const int32_t* __restrict__ keys,
                      const AttnTile* __restrict__ tiles, int32_t qh, int32_t kvh, int32_t D,
                      int32_t G, float scale, bf16* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char tc_smem[];
  WmmaCtx c;
  TcAttentionBlock(c, tiles[blockIdx.x], static_cast<int32_t>(blockIdx.y), tc_smem, q, kc, vc, keys,
                   qh, kvh, D, G, scale, out);
}

__global__ void SwiGluKernel(const float* __restrict__ gu, int64_t T, int32_t I,
                             bf16* __restrict__ act) {
  const int64_t n = T * I;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / I, i = idx - t * I;
    const float g = gu[t * 2 * I + i];
    const float u = gu[t * 2 * I + I + i];
    act[idx] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
  }
}

__global__ void LogprobsKernel(const float* __restrict__ logits, int32_t V,
                               const int32_t* __restrict__ rows,
                               const int32_t* __restrict__ targets, float* __restrict__ out) {
  __shared__ float sh[kWarp];
  const int32_t i = blockIdx.x;
  const float* row = logits + static_cast<int64_t>(rows[i]) * V;
  float mx = -INFINITY;
  for (int32_t v = threadIdx.x; v < V; v += blockDim.x) mx = fmaxf(mx, row[v]);
  mx = BlockReduce<true>(mx, sh);
  float sum = 0.0f;
  for (int32_t v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - mx);
  sum = BlockReduce<false>(sum, sh);
  if (threadIdx.x == 0) out[i] = row[targets[i]] - (mx + logf(sum));
}

__device__ __forceinline__ uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillRandomKernel(bf16* __restrict__ p, int64_t n, uint64_t seed, float scale) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = SplitMix64(seed * 0x632be59bd9b4e019ull + static_cast<uint64_t>(idx));
    // 24 random bits -> [-1, 1).
    const float u = static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
    p[idx] = __float2bfloat16(u * scale);
  }
}

__global__ void FillF32Kernel(float* __restrict__ p, int64_t n, float value) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[idx] = value;
  }
}

int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

cudaError_t LaunchEmbedding(const int32_t* tokens, int32_t T, const bf16* embed,
                            int32_t vocab_begin, int32_t vocab_local, int32_t H, float* x,
                            cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  EmbeddingKernel<<<T, 256, 0, stream>>>(tokens, embed, vocab_begin, vocab_local, H, x);
  return cudaGetLastError();
}

cudaError_t LaunchAddRmsNorm(float* x, const float* add, const float* w, int32_t T, int32_t H,
                             float eps, bf16* h, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  const int threads = H >= 4096 ? 1024 : (H >= 1024 ? 512 : 256);
  AddRmsNormKernel<<<T, threads, 0, stream>>>(x, add, w, H, eps, h);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const bf16* in, const int32_t* rows, int32_t R, int32_t cols,
                             bf16* out, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  GatherRowsKernel<bf16><<<R, 256, 0, stream>>>(in, rows, cols, out);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const float* in, const int32_t* rows, int32_t R, int32_t cols,
                             float* out, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  GatherRowsKernel<float><<<R, 256, 0, stream>>>(in, rows, cols, out);
  return cudaGetLastError();
}

cudaError_t LaunchQkvPost(const float* qkv, const float* bias, const float* q_norm,
                          const float* k_norm, const float* positions, const float* inv_freq,
                          const int32_t* slots, int32_t T, int32_t qh, int32_t kvh, int32_t D,
                          float eps, float* q_out, bf16* k_layer, bf16* v_layer,
                          cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (D % 2 != 0) return cudaErrorInvalidValue;
  QkvPostKernel<<<T, 128, 0, stream>>>(qkv, bias, q_norm, k_norm, positions, inv_freq, slots, qh,
                                       kvh, D, eps, q_out, k_layer, v_layer);
  return cudaGetLastError();
}

size_t AttentionSharedBytes(int32_t rows, int32_t D) {
  return sizeof(float) * AttentionSharedFloats(rows, D);
}

// Raises `kernel`'s dynamic shared memory limit to `bytes`, once per device and only
// ever upwards (backends of different head dims may share a device).
template <typename Kernel>
cudaError_t RaiseSharedMemory(Kernel* kernel, size_t bytes, std::mutex* mu,
                              std::map<int, size_t>* prepared) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(*mu);
  size_t& have = (*prepared)[dev];
  if (bytes <= have) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
  if (e == cudaSuccess) have = bytes;
  return e;
}

cudaError_t PrepareAttention(size_t bytes) {
  static std::mutex mu;
  static std::map<int, size_t> prepared;
  return RaiseSharedMemory(AttentionKernel, bytes, &mu, &prepared);
}

cudaError_t LaunchAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                            const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                            int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                            float scale, bf16* out, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  if (kvh <= 0 || qh % kvh != 0 || max_tile_tokens <= 0 || kvh > 65535) {
    return cudaErrorInvalidValue;
  }
  const int32_t G = qh / kvh;
  const size_t smem = AttentionSharedBytes(max_tile_tokens * G, D);
  dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(kvh));
  AttentionKernel<<<grid, kAttnThreads, smem, stream>>>(q, k_layer, v_layer, keys, tiles, qh, kvh,
                                                        D, G, scale, out);
  return cudaGetLastError();
}

cudaError_t PrepareSplitAttention(size_t bytes) {
  static std::mutex mu;
  static std::map<int, size_t> prepared;
  return RaiseSharedMemory(SplitAttentionKernel, bytes, &mu, &prepared);
}

cudaError_t LaunchSplitAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                                 const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                                 int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                                 float scale, int32_t nsplit, int32_t min_keys, float* workspace,
                                 bf16* out, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  if (kvh <= 0 || qh % kvh != 0 || max_tile_tokens <= 0 || kvh > 65535 || nsplit < 1 ||
      nsplit > kMaxSplits || min_keys < 1) {
    return cudaErrorInvalidValue;
  }
  const int32_t G = qh / kvh;
  const size_t stride = SplitPartialFloats(max_tile_tokens * G, D);
  const size_t smem = AttentionSharedBytes(max_tile_tokens * G, D);
  dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(kvh),
            static_cast<unsigned>(nsplit));
  SplitAttentionKernel<<<grid, kAttnThreads, smem, stream>>>(q, k_layer, v_layer, keys, tiles, qh,
                                                             kvh, D, G, scale, min_keys, stride,
                                                             workspace);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  dim3 cgrid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(kvh));
  CombineAttentionKernel<<<cgrid, kAttnThreads, 0, stream>>>(tiles, workspace, nsplit, stride, qh,
                                                             kvh, D, G, out);
  return cudaGetLastError();
}

size_t TcAttentionSharedBytesFor(int32_t D) { return TcAttentionSharedBytes(D); }

cudaError_t PrepareTcAttention(int32_t D) {
  if (!TcAttentionSupported(D, 1)) return cudaErrorInvalidValue;
  static std::mutex mu;
  static std::map<int, size_t> prepared;
  return RaiseSharedMemory(TcAttentionKernel, TcAttentionSharedBytes(D), &mu, &prepared);
}

cudaError_t LaunchTcAttention(const float* q, const bf16* k_layer, const bf16* v_layer,
                              const int32_t* keys, const AttnTile* tiles, int32_t num_tiles,
                              int32_t max_tile_tokens, int32_t qh, int32_t kvh, int32_t D,
                              float scale, bf16* out, cudaStream_t stream) {
  if (num_tiles <= 0) return cudaSuccess;
  if (kvh <= 0 || qh % kvh != 0 || max_tile_tokens <= 0 || kvh > 65535 ||
      !TcAttentionSupported(D, qh / kvh) || max_tile_tokens * (qh / kvh) > kTcRows) {
    return cudaErrorInvalidValue;
  }
  const int32_t G = qh / kvh;
  dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(kvh));
  TcAttentionKernel<<<grid, kTcThreads, TcAttentionSharedBytes(D), stream>>>(
      q, k_layer, v_layer, keys, tiles, qh, kvh, D, G, scale, out);
  return cudaGetLastError();
}

cudaError_t LaunchSwiGlu(const float* gu, int32_t T, int32_t I, bf16* act, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * I;
  if (n <= 0) return cudaSuccess;
  SwiGluKernel<<<GridFor(n, 256), 256, 0, stream>>>(gu, T, I, act);
  return cudaGetLastError();
}

cudaError_t LaunchLogprobs(const float* logits, int32_t V, const int32_t* rows,
                           const int32_t* targets, int32_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  LogprobsKernel<<<n, 256, 0, stream>>>(logits, V, rows, targets, out);
  return cudaGetLastError();
}

namespace {
struct TopCtx : DeviceCtx {
  __device__ void atomic_add(uint32_t* p, uint32_t v) const { atomicAdd(p, v); }
};

// grid R: one block per compact row; the body is cuda/top_logits_body.h.
__global__ void __launch_bounds__(kTopThreads)
    TopLogitsKernel(const float* __restrict__ logits, int32_t V, const int32_t* __restrict__ rows,
                    const int32_t* __restrict__ ns, int32_t* __restrict__ out_id,
                    float* __restrict__ out_logit, float* __restrict__ out_lse) {
  __shared__ TopLogitsShared sh;
  TopCtx c;
  const int32_t r = static_cast<int32_t>(blockIdx.x);
  TopLogitsRow(c, logits + static_cast<size_t>(rows[r]) * V, V, ns[r], sh,
               out_id + static_cast<size_t>(r) * kTopMax,
               out_logit + static_cast<size_t>(r) * kTopMax, out_lse + r);
}
}  // namespace

cudaError_t LaunchTopLogits(const float* logits, int32_t V, const int32_t* rows,
                            const int32_t* ns, int32_t R, int32_t* out_id, float* out_logit,
                            float* out_lse, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  TopLogitsKernel<<<R, kTopThreads, 0, stream>>>(logits, V, rows, ns, out_id, out_logit, out_lse);
  return cudaGetLastError();
}

namespace {
struct SampleCtx : DeviceCtx {
  __device__ void atomic_add(unsigned long long* p, unsigned long long v) const {
    atomicAdd(p, v);
  }
};

// grid R: one block per sampled row; the body is cuda/sample_body.h.
__global__ void __launch_bounds__(kSampleThreads)
    SampleRowsKernel(const float* __restrict__ logits, int32_t V, const int32_t* __restrict__ rows,
                     const engine::RowSampling* __restrict__ params, int32_t* __restrict__ out_token,
                     float* __restrict__ out_logit) {
  __shared__ SampleShared sh;
  SampleCtx c;
  const int32_t r = static_cast<int32_t>(blockIdx.x);
  const engine::RowSampling s = params[r];
  SampleRowBlock(c, logits + static_cast<size_t>(rows[r]) * V, V, s, sh, out_token + r,
                 out_logit + r);
}
}  // namespace

cudaError_t LaunchSampleRows(const float* logits, int32_t V, const int32_t* rows,
                             const engine::RowSampling* params, int32_t R, int32_t* out_token,
                             float* out_logit, cudaStream_t stream) {
  if (R <= 0) return cudaSuccess;
  SampleRowsKernel<<<R, kSampleThreads, 0, stream>>>(logits, V, rows, params, out_token,
                                                     out_logit);
  return cudaGetLastError();
}

cudaError_t LaunchFillRandom(bf16* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillRandomKernel<<<GridFor(n, 256), 256, 0, stream>>>(p, n, seed, scale);
  return cudaGetLastError();
}

cudaError_t LoadKernels() {
  const void* kernels[] = {reinterpret_cast<const void*>(EmbeddingKernel),
                           reinterpret_cast<const void*>(AddRmsNormKernel),
                           reinterpret_cast<const void*>(GatherRowsKernel<bf16>),
                           reinterpret_cast<const void*>(GatherRowsKernel<float>),
                           reinterpret_cast<const void*>(QkvPostKernel),
                           reinterpret_cast<const void*>(AttentionKernel),
                           reinterpret_cast<const void*>(TcAttentionKernel),
                           reinterpret_cast<const void*>(SplitAttentionKernel),
                           reinterpret_cast<const void*>(CombineAttentionKernel),
                           reinterpret_cast<const void*>(SwiGluKernel),
                           reinterpret_cast<const void*>(LogprobsKernel),
                           reinterpret_cast<const void*>(TopLogitsKernel),
                           reinterpret_cast<const void*>(SampleRowsKernel),
                           reinterpret_cast<const void*>(FillRandomKernel),
                           reinterpret_cast<const void*>(FillF32Kernel)};
  for (const void* k : kernels) {
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, k);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t LaunchFillF32(float* p, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillF32Kernel<<<GridFor(n, 256), 256, 0, stream>>>(p, n, value);
  return cudaGetLastError();
}

}  // namespace superpose::cuda
