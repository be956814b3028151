#!/usr/bin/env bash
# Builds Debian's own abseil (same version and patches as libabsl-dev) with
# ThreadSanitizer, as shared libraries with Debian's sonames, into $1 (default
# build-tsan/abseil). ThreadSanitizer only sees synchronisation in instrumented code:
# with Debian's uninstrumented libabsl every absl::Mutex would look like no lock at
# all. Tests then run with LD_LIBRARY_PATH=$1/lib, so that our code, gRPC and
# everything else in the process use this one instrumented abseil.
#   scripts/tsan-abseil.sh [PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(realpath -m "${1:-build-tsan/abseil}")
if [ -f "$prefix/.done" ]; then
  echo "tsan-abseil: $prefix is built"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
# The source package comes from the same Debian archive as the binaries.
list=/etc/apt/sources.list.d/superpose-deb-src.list
if ! apt-get source --print-uris abseil >/dev/null 2>&1; then
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
    "http://deb.debian.org/debian bookworm main" | $SUDO tee "$list" >/dev/null
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The installed libabsl-dev's version, so headers and libraries agree.
version=$(dpkg-query -W -f='${source:Version}\n' libabsl-dev | head -1)
(cd "$work" && apt-get source -qq "abseil=$version" >/dev/null 2>&1)
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'abseil-*' | head -1)
[ -n "$src" ] || { echo "tsan-abseil: no source for abseil $version" >&2; exit 1; }
cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=17 \
  -DBUILD_SHARED_LIBS=ON -DBUILD_TESTING=OFF -DCMAKE_CXX_FLAGS="-fsanitize=thread -O1" \
  -DCMAKE_INSTALL_PREFIX="$prefix" >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log" >&2; exit 1; }
ninja -C "$work/build" -j"$(nproc)" install >/dev/null
# Same sonames as Debian's, or the loader would not pick these up for gRPC.
ls "$prefix/lib" | grep -q "libabsl_synchronization.so.$(
  ls /usr/lib/*/libabsl_synchronization.so.* | head -1 | sed 's/.*\.so\.\([0-9]*\).*/\1/')" || {
  echo "tsan-abseil: sonames differ from the system abseil" >&2
  exit 1
}
touch "$prefix/.done"
echo "tsan-abseil: abseil $version with ThreadSanitizer in $prefix"
