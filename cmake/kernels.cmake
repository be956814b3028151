# SUPERPOSE_KERNELS_ONLY: the CPU kernels (Highway, runtime dispatch) and their unit
# tests, nothing else (no gRPC, no models): what scripts/arm-check.sh cross-compiles for
# aarch64 and runs under qemu-user, so that the NEON paths are built and tested in CI.
find_package(hwy CONFIG REQUIRED)
find_package(GTest CONFIG REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(OpenMP REQUIRED)
# (the sampler too: its row passes are kernels, and sampler_test checks them bitwise)
set(SP_KERNEL_SRC engine/simd.cc engine/row_math.cc engine/row_sampling.cc
  engine/runtime/sampler.cc engine/backend.cc)
file(GLOB SP_KERNEL_CPU_SRC CONFIGURE_DEPENDS engine/cpu/small_gemm.cc engine/cpu/bf16_gemm.cc
  engine/cpu/bf16_widen.cc engine/cpu/attention.cc engine/cpu/elementwise.cc)
add_library(sp_kernels STATIC ${SP_KERNEL_SRC} ${SP_KERNEL_CPU_SRC})
target_include_directories(sp_kernels PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(sp_kernels PUBLIC hwy::hwy OpenMP::OpenMP_CXX absl::status absl::statusor absl::strings
  absl::flat_hash_map absl::flat_hash_set absl::span)
target_compile_definitions(sp_kernels PUBLIC
  "HWY_DISABLED_TARGETS=(HWY_SSSE3|HWY_SVE|HWY_SVE2|HWY_SVE_256|HWY_SVE2_128)")
enable_testing()
include(GoogleTest)
# The tests that need nothing but the kernels.
foreach(name simd_test small_gemm_test bf16_gemm_test cpu_elementwise_test sampler_test
        attention_kernel_test)
  if(EXISTS ${CMAKE_SOURCE_DIR}/tests/${name}.cc)
    add_executable(${name} tests/${name}.cc)
    target_link_libraries(${name} PRIVATE sp_kernels GTest::gtest_main)
    gtest_discover_tests(${name} DISCOVERY_MODE PRE_TEST PROPERTIES TIMEOUT 600 LABELS kernels)
  endif()
endforeach()
