#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ (Debian clang-14, -fsanitize=fuzzer,address,undefined;
# only the parsers they need, no backend, no CUDA) in build-fuzz/, writes seed corpora from
# ../shared/fixtures (fuzz/make_seeds.py) and runs each target for N seconds, one at a time.
# Fails on the first crash, sanitizer report or broken invariant, printing the reproducer.
#   scripts/fuzz.sh                 20 s per target (CI)
#   scripts/fuzz.sh --seconds=600   longer runs by hand (docs/reliability.md, "Fuzzing")
#   scripts/fuzz.sh --target=config_fuzz   one target
# The corpus grows in build-fuzz/corpus/<target>/ across runs; logs in build-fuzz/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=20
targets="tokenizer_fuzz tokenizer_json_fuzz config_fuzz safetensors_fuzz request_fuzz openai_request_fuzz"
for arg in "$@"; do
  case "$arg" in
    --seconds=*) seconds="${arg#*=}" ;;
    --target=*) targets="${arg#*=}" ;;
    *) echo "fuzz: unknown argument $arg" >&2; exit 2 ;;
  esac
done
if [ ! -d ../shared/fixtures ]; then
  echo "fuzz: ../shared/fixtures is missing (the fixtures live beside the checkout)" >&2
  exit 1
fi
CXX_FUZZ=${CXX_FUZZ:-clang++-14}
dir=${BUILD_FUZZ:-build-fuzz}
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSUPERPOSE_FUZZ=ON \
  -DSUPERPOSE_CUDA=OFF -DSUPERPOSE_WERROR=ON -DCMAKE_CXX_COMPILER="$CXX_FUZZ" \
  "${launcher[@]}" >/dev/null
# shellcheck disable=SC2086
ninja -C "$dir" -j"$(nproc)" $targets
rm -rf "$dir/seeds"
python3 fuzz/make_seeds.py ../shared proto "$dir/seeds"
mkdir -p "$dir/logs" "$dir/artifacts"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
for t in $targets; do
  name=${t%_fuzz}
  corpus="$dir/corpus/$name"
  log="$dir/logs/$name.log"
  mkdir -p "$corpus"
  rm -f "$dir/artifacts/$name-"*
  if "$dir/fuzz/$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 \
      -print_final_stats=1 -artifact_prefix="$dir/artifacts/$name-" \
      "$corpus" "$dir/seeds/$name" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)
    echo "fuzz: $t: ${seconds}s, ${runs} runs, ${cov}, no findings"
  else
    status=1
    echo "fuzz: $t FAILED; log: $log" >&2
    grep -E 'invariant failed|ERROR: |SUMMARY: |runtime error' "$log" | head -5 >&2 || true
    for a in "$dir/artifacts/$name-"*; do
      [ -e "$a" ] || continue
      echo "fuzz: reproducer: $a  (rerun: $dir/fuzz/$t $a)" >&2
    done
  fi
done
exit "$status"
