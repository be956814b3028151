// The number of vector registers of the SIMD target being compiled, for kernels that size
// their register tiles by it: 32 on x86 AVX-512 and on Arm, 16 elsewhere (AVX2, SSE4).
// Per-target header (Highway's idiom): include it after hwy/foreach_target.h.
#if defined(SUPERPOSE_ENGINE_CPU_VECTOR_REGISTERS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef SUPERPOSE_ENGINE_CPU_VECTOR_REGISTERS_INL_H_
#undef SUPERPOSE_ENGINE_CPU_VECTOR_REGISTERS_INL_H_
#else
#define SUPERPOSE_ENGINE_CPU_VECTOR_REGISTERS_INL_H_
#endif

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace superpose::engine::cpu {
namespace HWY_NAMESPACE {

#if HWY_ARCH_ARM || (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

}  // namespace HWY_NAMESPACE
}  // namespace superpose::engine::cpu
HWY_AFTER_NAMESPACE();

#endif  // SUPERPOSE_ENGINE_CPU_VECTOR_REGISTERS_INL_H_
