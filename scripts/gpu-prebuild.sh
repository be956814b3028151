#!/usr/bin/env bash
# Prepares .gpu-prebuilt/ (git-ignored) for scripts/gpu-check.sh on a GPU machine that
# cannot build superpose itself (no network, no Debian -dev packages): builds the GPU
# tests and benchmark here for sm_90a, and copies them with the non-CUDA shared
# libraries they load (OpenBLAS, abseil, spdlog, ...; about 50 MB) and the stories260k
# fixtures. cuBLAS, NCCL and the CUDA runtime come from the GPU machine (too big to
# carry). Then carry .gpu-prebuilt along and run scripts/gpu-check.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSUPERPOSE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null
bins="cuda_backend_test cuda_step_meta_test tensor_parallel_test golden_test cuda_lora_test cuda_quant_test cuda_layer_sharing_test cuda_lazy_test"
ninja -C build-gpu $bins cuda_bench
rm -rf .gpu-prebuilt
mkdir -p .gpu-prebuilt/bin .gpu-prebuilt/lib .gpu-prebuilt/shared/fixtures
for b in $bins; do cp "build-gpu/$b" .gpu-prebuilt/bin/; done
cp build-gpu/bench/cuda_bench .gpu-prebuilt/bin/
# Shared libraries except glibc's, the driver's and CUDA's own. libmvec (the CPU
# backend's vector expf) is glibc's too: it reads ld.so's private _rtld_global_ro, whose
# layout changes between glibc versions, so it must come from the GPU machine's glibc.
for b in .gpu-prebuilt/bin/*; do ldd "$b"; done | awk '/=> \//{print $3}' | sort -u |
  grep -vE '/(libc|libm|libmvec|libdl|libpthread|librt|ld-linux[^/]*)\.so|/libcuda\.so|/libnvidia|/usr/local/cuda|/libcu(blas|blasLt|dart)|/libnccl' |
  xargs -r cp -L -t .gpu-prebuilt/lib/
cp -r ../shared/fixtures/stories260k .gpu-prebuilt/shared/fixtures/
git rev-parse HEAD >.gpu-prebuilt/COMMIT
du -sh .gpu-prebuilt
echo "gpu-prebuild: carry .gpu-prebuilt to the GPU machine and run scripts/gpu-check.sh there"
