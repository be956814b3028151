// The attention kernel's work item (shared by the host-side step builder and
// cuda/kernels.cu, which nvcc compiles without the engine headers).
#pragma once

#include <cstdint>

// Functions of the kernel bodies (attention_body.h, attention_tc_body.h), which compile
// both as CUDA device code and as plain C++ for the CPU emulation tests.
#if defined(__CUDACC__)
#define SP_ATTN_FN __device__ __forceinline__
#define SP_ATTN_HD __host__ __device__
#else
#define SP_ATTN_FN inline
#define SP_ATTN_HD
#endif

namespace superpose::cuda {

// One work item of attention: `ntok` consecutive new tokens of one sequence.
struct AttnTile {
  int32_t key_off;  // first entry of the sequence's key list in the keys array
  int32_t ctx_len;  // cached (context) keys of the sequence, before its new tokens
  int32_t tok0;     // plan index of the tile's first token
  int32_t i0;       // index of that token among the sequence's new tokens
  int32_t ntok;     // tokens in the tile, 1..tile_tokens
};
static_assert(sizeof(AttnTile) == 5 * sizeof(int32_t), "AttnTile is packed into int32 words");

}  // namespace superpose::cuda
