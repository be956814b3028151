#!/usr/bin/env bash
# superpose against the llama.cpp CPU peer (shared/tools/peers, README.md there) on the
# same random 125M Llama, interleaved round by round in one run, with the peer's
# definitions: prefill of a 512-token prompt (TTFT), decode batch 1 (an 8-token prompt,
# 128 greedy steps, EOS ignored), 16 streams in lock-step (aggregate tok/s), prompt ids
# 259 + s mod (n_vocab - 259) from the LCG s = 1664525 s + 1013904223 mod 2^32, 2 threads.
# F32: superpose hf-f32 (--cpu_dtype=float32) vs llama.cpp GGUF F32; BF16: superpose
# hf-bf16 (--cpu_dtype=bfloat16) vs llama.cpp GGUF F16 (the same bytes per weight).
# superpose runs engine-level batch 1 (build/bench/decode_bench) and served batch 1,
# 16 streams and TTFT through superpose-server + superpose-load. Memory bandwidth (the
# peer's membw) before and after; the batch-1 floor = weight bytes per token / read-only
# bandwidth (the higher of the two probes). Prints a markdown table with medians over the
# rounds and the ratios.
#
#   bench/peer_compare.sh [--scratch=/work/peer] [--build=build] [--rounds=3] [--simd=auto]
#                         [--peer_simd=same] [--threads=2] [--quick] [--out=DIR]
# --scratch  the peer's setup folder (setup.sh SCRATCH: models/, npm/, bin/membw)
# --build    superpose's build folder (superpose-server, superpose-load, bench/decode_bench)
# --simd     cap superpose's SIMD target (auto, avx3, avx2, sse4, ...; as the server's
#            --simd); at avx2 and below OpenBLAS runs its Haswell kernels (unless
#            OPENBLAS_CORETYPE is set).
# --peer_simd  same (default): llama.cpp is capped like superpose, loading the ggml CPU
#            variant a CPU without the capped features would load (avx2: haswell, what an
#            AVX2-only EPYC Zen 2/3 runs; sse4: sse42), from a hard-linked copy of the npm
#            folder without the higher variants; native: its own dispatch (the best variant)
# --quick    one round, 32 decode steps instead of 128 (a smoke run; numbers not comparable)
# --out      keep the raw results (JSON, logs) there (default: a temp folder, removed)
# Env: PEER_DIR (default: shared/tools/peers beside the repo, i.e. ../shared/tools/peers).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
scratch=/work/peer
build=$repo/build
rounds=3
simd=auto
peer_simd=same
threads=2
quick=0
out=
usage() { sed -n '2,28p' "${BASH_SOURCE[0]}"; exit 2; }
for a in "$@"; do
  case $a in
    --scratch=*) scratch=${a#*=} ;;
    --build=*) build=${a#*=} ;;
    --rounds=*) rounds=${a#*=} ;;
    --simd=*) simd=${a#*=} ;;
    --peer_simd=*) peer_simd=${a#*=} ;;
    --threads=*) threads=${a#*=} ;;
    --quick) quick=1 ;;
    --out=*) out=${a#*=} ;;
    *) usage ;;
  esac
done
peer=${PEER_DIR:-$repo/../shared/tools/peers}
decode=128
prefill=512
if [ "$quick" = 1 ]; then
  rounds=1
  decode=32
fi
build=$(cd "$build" && pwd)
models=$scratch/models/random-llama-125m
for f in "$peer/bench_llamacpp.mjs" "$peer/membw.c" "$scratch/npm/node_modules/node-llama-cpp/package.json" \
  "$models/hf-f32/model.safetensors" "$models/hf-bf16/model.safetensors" \
  "$models/gguf/random-llama-125m-f32.gguf" "$models/gguf/random-llama-125m-f16.gguf" \
  "$build/superpose-server" "$build/superpose-load" "$build/bench/decode_bench"; do
  [ -e "$f" ] || { echo "missing $f (peer: bash $peer/setup.sh $scratch; superpose: cmake --build $build --target superpose-server superpose-load decode_bench)" >&2; exit 1; }
done
tmp_out=0
if [ -z "$out" ]; then
  out=$(mktemp -d)
  tmp_out=1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
servers=()
cleanup_servers() {
  for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${servers[@]}"; do wait "$p" 2>/dev/null || true; done
  servers=()
}
cleanup() {
  cleanup_servers
  [ "$tmp_out" = 0 ] || rm -rf "$out"
}
trap cleanup EXIT
membw=$scratch/bin/membw
if [ ! -x "$membw" ]; then
  membw=$out/membw
  cc -O3 -march=native -pthread -o "$membw" "$peer/membw.c"
fi
# The OpenBLAS kernels a CPU without AVX-512 (or without AVX2) would get.
case ${simd,,} in
  avx2) export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Haswell} ;;
  sse4 | emu128 | scalar) export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-Nehalem} ;;
esac

log() { printf '[peer_compare] %s\n' "$*" >&2; }

# llama.cpp capped like superpose: ggml loads the highest-scoring libggml-cpu-<variant>.so
# beside its addon that the CPU supports, so a copy without the variants above the cap
# loads what a CPU without those features would (the copy is hard links: no space).
peer_npm=$scratch/npm
peer_cap=
if [ "$peer_simd" = same ]; then
  case ${simd,,} in
    avx2) peer_cap="haswell" ;;  # AVX2 + FMA + F16C + BMI2, no AVX-512, no AVX-VNNI
    sse4 | emu128 | scalar) peer_cap="sse42" ;;
  esac
elif [ "$peer_simd" != native ]; then
  echo "--peer_simd is same or native" >&2
  exit 2
fi
if [ -n "$peer_cap" ]; then
  peer_npm=$scratch/npm-cap-$peer_cap
  if [ ! -d "$peer_npm" ]; then
    cp -al "$scratch/npm" "$peer_npm.tmp"
    case $peer_cap in
      haswell) drop="zen4 skylakex cannonlake cascadelake cooperlake icelake alderlake sapphirerapids" ;;
      sse42) drop="zen4 skylakex cannonlake cascadelake cooperlake icelake alderlake sapphirerapids haswell sandybridge ivybridge piledriver" ;;
    esac
    for v in $drop; do
      rm -f "$peer_npm.tmp"/node_modules/@node-llama-cpp/linux-x64*/bins/linux-x64*/libggml-cpu-"$v".so
    done
    mv "$peer_npm.tmp" "$peer_npm"
  fi
fi
# The ggml CPU variant llama.cpp loads (its debug log names the file).
peer_variant=$(cd "$peer" && node bench_llamacpp.mjs golden --npm-dir "$peer_npm" \
  --model "$scratch/models/stories260k-f32.gguf" \
  --golden "$repo/../shared/fixtures/stories260k/golden.json" --logLevel debug 2>&1 |
  grep -o 'libggml-cpu-[a-z0-9_]*\.so' | head -1 || true)
peer_variant=${peer_variant#libggml-cpu-}
peer_variant=${peer_variant%.so}
log "llama.cpp CPU variant: ${peer_variant:-unknown}"

# Busy jiffies of the whole machine (to report what other processes took during the run).
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }

# start_server NAME MODEL_DIR DTYPE -> sets port_NAME
start_server() {
  local name=$1 dir=$2 dtype=$3 pf=$out/$1.port
  rm -f "$pf"
  "$build/superpose-server" --model="$dir" --listen=127.0.0.1:0 --port_file="$pf" \
    --metrics_listen= --threads="$threads" --simd="$simd" --cpu_dtype="$dtype" \
    --max_running=64 --max_batch_tokens=512 --log_level=info >"$out/server-$name.log" 2>&1 &
  servers+=($!)
  for _ in $(seq 1 600); do
    [ -s "$pf" ] && break
    kill -0 "${servers[-1]}" 2>/dev/null || { cat "$out/server-$name.log" >&2; exit 1; }
    sleep 0.1
  done
  [ -s "$pf" ] || { echo "server $name did not start" >&2; exit 1; }
  printf -v "port_$name" '%s' "$(cat "$pf")"
}

# load NAME OUT_JSON [superpose-load flags]
load() {
  local name=$1 json=$2 port
  shift 2
  port=port_$name
  "$build/superpose-load" --server="127.0.0.1:${!port}" --requests_per_stream=1 --prompt_ids=lcg \
    --markdown=false --json="$json" "$@" >/dev/null 2>>"$out/load.log"
}

# One round of superpose: engine batch 1, served TTFT, batch 1, 16 streams.
superpose_round() {
  local name=$1 dir=$2 dtype=$3 r=$4
  local o=$out/sp-$name-r$r
  log "round $r superpose $name"
  "$build/bench/decode_bench" --models="$dir" --dtypes="$dtype" --batch=1 --steps="$decode" \
    --threads="$threads" --simd="$simd" --bandwidth=false >"$o.engine.md" 2>&1
  load "$name" "$o.prefill.json" --concurrency=1 --prompt_tokens=$prefill --max_new_tokens=1 \
    --prompt_seed=$((1234 + r))
  load "$name" "$o.b1.json" --concurrency=1 --prompt_tokens=8 --max_new_tokens=$decode \
    --prompt_seed=$((99 + 7 * r))
  load "$name" "$o.x16.json" --concurrency=16 --prompt_tokens=8 --max_new_tokens=$decode \
    --prompt_seed=$((99 + 7 * r))
}

# One round of llama.cpp (its own warm-up of each measure, then one measured run).
peer_round() {
  local name=$1 gguf=$2 r=$3
  log "round $r llama.cpp $name"
  node "$peer/bench_llamacpp.mjs" bench --npm-dir "$peer_npm" --threads "$threads" \
    --model "$gguf" --ctx 1024 --prefill $prefill --decode $decode --runs 1 --parallel 16 \
    --json "$out/peer-$name-r$r.json" >"$out/peer-$name-r$r.md" 2>>"$out/peer.log"
}

t_start=$(date +%s.%N)
busy_start=$(busy_jiffies)
log "membw before"
"$membw" --threads "$threads" | tail -1 >"$out/membw-before.json"
start_server f32 "$models/hf-f32" float32
start_server bf16 "$models/hf-bf16" bfloat16
log "servers up; warm-up"
for name in f32 bf16; do
  load "$name" "$out/warmup-$name.json" --concurrency=1,16 --prompt_tokens=8 --max_new_tokens=8 \
    --prompt_seed=7
done
for r in $(seq 1 "$rounds"); do
  peer_round f32 "$models/gguf/random-llama-125m-f32.gguf" "$r"
  superpose_round f32 "$models/hf-f32" float32 "$r"
  peer_round f16 "$models/gguf/random-llama-125m-f16.gguf" "$r"
  superpose_round bf16 "$models/hf-bf16" bfloat16 "$r"
done
cleanup_servers
log "membw after"
"$membw" --threads "$threads" | tail -1 >"$out/membw-after.json"
busy_end=$(busy_jiffies)
t_end=$(date +%s.%N)
own_cpu=$(awk '{print $14+$15+$16+$17}' /proc/$$/stat)

python3 - "$out" "$rounds" "$decode" "$prefill" "$threads" "$simd" "$quick" \
  "$(grep -o 'simd=[A-Za-z0-9_]*' "$out/server-f32.log" | head -1 | cut -d= -f2)" \
  "$(grep -o 'omp_wait=[^ ]*' "$out/server-f32.log" | head -1 | cut -d= -f2)" \
  "$(grep -o 'blas_core=[^ ]*' "$out/server-f32.log" | head -1 | cut -d= -f2)" \
  "$(grep -o 'kv_dtype=[^ ]*' "$out/server-f32.log" | head -1 | cut -d= -f2)/$(grep -o 'kv_dtype=[^ ]*' "$out/server-bf16.log" | head -1 | cut -d= -f2)" \
  "$(awk -F: '/^model name/{sub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo)" \
  "$(nproc)" "$t_start" "$t_end" "$busy_start" "$busy_end" "$own_cpu" "$(getconf CLK_TCK)" "${peer_variant:-unknown}" <<'EOF'
import glob, json, os, re, statistics, sys
(out, rounds, decode, prefill, threads, simd, quick, active, omp_wait, blas, kv, cpu, ncpu,
 t0, t1, b0, b1, own, hz, peer_variant) = sys.argv[1:]
rounds, decode, prefill = int(rounds), int(decode), int(prefill)
hz = int(hz)
wall = float(t1) - float(t0)
# The machine's busy time over the run, less this script's children (node, the servers,
# the clients): what other processes on the host took, in cores.
others = max(0.0, (int(b1) - int(b0)) / hz - int(own) / hz) / wall

def med(xs):
    return statistics.median(xs) if xs else float("nan")

def rng(xs):
    return f" [{min(xs):.1f}–{max(xs):.1f}]" if len(xs) > 1 else ""

def peer(name, key):
    xs = []
    for r in range(1, rounds + 1):
        m = json.load(open(f"{out}/peer-{name}-r{r}.json"))["models"][0]
        xs.append(m["parallel"][0]["tok_s"] if key == "x16" else m[key]["tok_s"])
    return xs

def peer_bytes(name):
    return json.load(open(f"{out}/peer-{name}-r1.json"))["models"][0]["weight_bytes_per_token"]

def sp(name, key):
    xs = []
    for r in range(1, rounds + 1):
        base = f"{out}/sp-{name}-r{r}"
        if key == "engine":
            rows = [l for l in open(base + ".engine.md") if l.startswith("| /")]
            xs.append(float(rows[0].split("|")[6]))
        else:
            lv = json.load(open(f"{base}.{key}.json"))["levels"][0]
            if lv["errors"]:
                raise SystemExit(f"{base}.{key}.json: {lv['errors']} failed requests")
            xs.append(prefill / (lv["ttft_ms_p50"] / 1000) if key == "prefill" else lv["tok_s"])
    return xs

def sp_bytes(name):
    rows = [l for l in open(f"{out}/sp-{name}-r1.engine.md") if l.startswith("| /")]
    return float(rows[0].split("|")[5]) * 1e6

bw = [json.load(open(f"{out}/membw-{w}.json")) for w in ("before", "after")]
read_bw = max(b["read_Bps_best"] for b in bw)
nlc = json.load(open(f"{out}/peer-f32-r1.json"))
gb = lambda x: f"{x / 1e9:.1f}"
print(f"CPU: {cpu} ({ncpu} cores), {threads} threads; superpose SIMD target {active} "
      f"(--simd={simd}), OpenBLAS {blas}, OpenMP wait {omp_wait}, KV cache {kv} (F32/BF16 "
      f"runs); llama.cpp node-llama-cpp {nlc['node_llama_cpp']} (ggml CPU variant {peer_variant}, KV cache "
      f"F16, flash attention auto)")
print(f"memory bandwidth ({threads} threads, best): before read-only {gb(bw[0]['read_Bps_best'])} GB/s, "
      f"copy {gb(bw[0]['copy_Bps_best'])} GB/s; after read-only {gb(bw[1]['read_Bps_best'])} GB/s, "
      f"copy {gb(bw[1]['copy_Bps_best'])} GB/s (copy counts bytes read + written)")
print(f"{rounds} interleaved round(s), medians [range]; prefill {prefill} tokens, decode {decode} "
      f"steps after an 8-token prompt; run {wall:.0f} s, other processes on the host took "
      f"{others:.2f} cores on average{' (QUICK: not comparable)' if quick == '1' else ''}")
print()
print("| measure | llama.cpp tok/s | superpose tok/s | superpose / llama.cpp |")
print("|---|---:|---:|---:|")
for name, sname, label, plabel in (("f32", "f32", "F32", "F32"), ("f16", "bf16", "BF16 (llama.cpp F16)", "F16")):
    p_pre, p_b1, p_x16 = peer(name, "prefill"), peer(name, "decode1"), peer(name, "x16")
    s_pre, s_eng, s_b1, s_x16 = sp(sname, "prefill"), sp(sname, "engine"), sp(sname, "b1"), sp(sname, "x16")
    rows = [
        (f"prefill {prefill}, {label} (TTFT; superpose served)", p_pre, s_pre),
        (f"decode batch 1, {label} (superpose engine, decode_bench)", p_b1, s_eng),
        (f"decode batch 1, {label} (superpose served)", p_b1, s_b1),
        (f"16 streams total, {label} (superpose served)", p_x16, s_x16),
    ]
    for what, p, s in rows:
        print(f"| {what} | {med(p):.1f}{rng(p)} | {med(s):.1f}{rng(s)} | {med(s) / med(p):.2f}x |")
    print(f"| 16 streams / own batch 1, {label} (served) | {med(p_x16) / med(p_b1):.1f}x | "
          f"{med(s_x16) / med(s_b1):.1f}x | |")
    pf, sf = read_bw / peer_bytes(name), read_bw / sp_bytes(sname)
    print(f"| batch-1 read-bandwidth floor, {label} ({peer_bytes(name) / 1e6:.0f} / "
          f"{sp_bytes(sname) / 1e6:.0f} MB per token) | {pf:.1f} (b1 at {100 * med(p_b1) / pf:.0f}%) | "
          f"{sf:.1f} (engine b1 at {100 * med(s_eng) / sf:.0f}%) | |")
EOF
