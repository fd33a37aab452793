#!/usr/bin/env bash
# The prepared GPU check: one run on an offline machine with an NVIDIA GPU, the CUDA toolkit, CMake,
# ninja, numpy and pytest. In one go it
#   1. installs the CUDA wheel of pyllm (built ahead of time, see README) and the wheels it needs
#      (cffi, pycparser, tqdm) from .whl/ or dist/, with no network;
#   2. builds llama.cpp's own llama-bench from the same vendored tree for this GPU only (in the
#      background), from vendor/llama.cpp or the carried vendor-src.tar.gz;
#   3. writes a synthetic llama-architecture model (~240M parameters, random weights) and runs the
#      `gpu` tests on it;
#   4. runs pyllm bench and llama-bench alternately for f16, q8_0 and q4_0 KV caches (pp512, tg128,
#      and both at depth 8192, flash attention on, -ngl 99) and writes the tables and the
#      pyllm/native ratios under $OUT (default: gpu-out/).
#
#   benchmarks/gpu_check.sh              # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run    # here, on the CPU: the same steps, tiny sizes, no CUDA
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
START=$(date +%s)
log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/steps.log"; }
JOBS=$(nproc)
# Seconds after the start by which llama-bench must be built; past it the build is stopped and
# pyllm's side is still measured (its tables, without ratios), so one run always reports something.
BUILD_DEADLINE=${BUILD_DEADLINE:-420}

# ---- 1. python packages, offline ----
if [ "$DRY" = 0 ]; then
  wheels=$(ls .whl/*.whl dist/pyllm-*.whl 2>/dev/null || true)
  [ -n "$wheels" ] || { log "no wheels in .whl/ or dist/: build the CUDA wheel first (README)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
  nvidia-smi > "$OUT/gpu.txt" 2>&1 || true
  # The wheel links the toolkit's libcudart/libcublas without an rpath (like any CUDA program):
  # when the loader cannot find them, look for them on this machine and put their folders on the path.
  so=$(ls /tmp/site/pyllm/_ffi/_native*.so)
  for lib in $(readelf -d "$so" | grep -o 'lib\(cudart\|cublas\)[^]]*'); do
    python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$lib" 2>/dev/null && continue
    dir=$(find /usr/local /opt /usr/lib -name "$lib" -printf '%h\n' 2>/dev/null | head -1)
    [ -n "$dir" ] || { log "$lib: not found on this machine"; exit 2; }
    export LD_LIBRARY_PATH=$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    log "$lib: from $dir"
  done
fi
PYLLM=(python3 -c "import sys; from pyllm.cli import main; sys.exit(main())")
(cd /tmp && "${PYLLM[@]}" info --json) > "$OUT/info.json"
log "pyllm: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["version"], d["backends"], d["cuda_architectures"])' "$OUT/info.json")"

# ---- 2. llama-bench from the same tree, in the background ----
if [ ! -f vendor/llama.cpp/include/llama.h ]; then
  [ -f vendor-src.tar.gz ] || { log "no vendor/llama.cpp and no vendor-src.tar.gz"; exit 2; }
  mkdir -p vendor/llama.cpp && tar xzf vendor-src.tar.gz -C vendor/llama.cpp
fi
NATIVE_BUILD=${NATIVE_BUILD:-/tmp/native-build}
if [ "$DRY" = 1 ]; then
  NATIVE_BUILD=${NATIVE_BUILD_DRY:-$ROOT/build/native}
  cmake_args=()
else
  cmake_args=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-native}"
              "-DGGML_CUDA_FA_QUANTS=f16-f16;q8_0-q8_0;q4_0-q4_0" -DGGML_NATIVE=OFF)
  # kernels for the three measured pairs, and the wheel's CUDA options (from info.json)
  if python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["cuda_vmm"] is False else 1)' "$OUT/info.json"; then
    cmake_args+=(-DGGML_CUDA_NO_VMM=ON)
  fi
fi
log "building llama-bench in $NATIVE_BUILD (${cmake_args[*]:-cpu})"
export -f log; export OUT START NATIVE_BUILD JOBS
setsid bash -c 't0=$(date +%s)
  cmake -S benchmarks/native -B "$NATIVE_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" > "$OUT/native-configure.log" 2>&1 &&
  cmake --build "$NATIVE_BUILD" --target llama-bench -j "$JOBS" > "$OUT/native-build.log" 2>&1 || exit 1
  log "llama-bench built in $(( $(date +%s) - t0 ))s"' build "${cmake_args[@]}" &
build_pid=$!

# ---- 3. model + gpu tests (while llama-bench compiles) ----
MODEL=${MODEL:-/tmp/pyllm-gpu-check.gguf}
if [ "$DRY" = 1 ]; then
  python3 tests/synthetic_gguf.py llama "$MODEL" n_embd=256 n_layer=4 n_head=8 n_head_kv=2 n_ff=512 n_vocab=${N_VOCAB:-0} > /dev/null
else
  # N_VOCAB: the README's H200 figures used the 259-token byte vocabulary (the default); N_VOCAB=151936
  # sizes the output layer, the logits read per token and pyllm's greedy argmax like a real model's.
  python3 tests/synthetic_gguf.py llama "$MODEL" n_embd=1024 n_layer=16 n_head=16 n_head_kv=4 n_ff=4096 n_ctx_train=32768 \
    n_vocab=${N_VOCAB:-0} > /dev/null
fi
log "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
set +e
# On the GPU machine a skipped GPU test is a failure (PYLLM_REQUIRE_GPU).
require=$(( 1 - DRY ))
# (from /tmp: `python3 -m` puts the cwd first on sys.path, and the source tree's pyllm/ has no extension)
(cd /tmp && PYLLM_REQUIRE_GPU=$require PYLLM_GPU_MODEL=$MODEL timeout 300 python3 -m pytest -q -p no:cacheprovider \
  --rootdir "$ROOT" -c "$ROOT/pyproject.toml" --import-mode=importlib "$ROOT/tests/gpu" -ra) > "$OUT/gpu-tests.txt" 2>&1
tests_rc=$?
log "gpu tests: rc=$tests_rc, $(tail -1 "$OUT/gpu-tests.txt")"
# The user-facing commands on the device: the plan against the GPU's free memory, and one generation.
ngl=$(( DRY ? 0 : 99 )); mem=$([ "$DRY" = 1 ] && echo 8GiB || echo gpu)
(cd /tmp && "${PYLLM[@]}" plan -m "$MODEL" -ngl $ngl --memory $mem -ctk f16,q8_0,q4_0 -fa on) > "$OUT/plan.txt" 2>&1
log "plan: rc=$?"
(cd /tmp && KV_CACHE_TYPE=q8_0 "${PYLLM[@]}" generate -m "$MODEL" -ngl $ngl -fa on -n 64 --temp 0 "The quick brown fox") \
  > "$OUT/generate.txt" 2>&1
log "generate: rc=$?, $(tail -1 "$OUT/generate.txt")"
set -e

while kill -0 $build_pid 2>/dev/null && [ $(( $(date +%s) - START )) -lt "$BUILD_DEADLINE" ]; do sleep 2; done
native_ok=0
if kill -0 $build_pid 2>/dev/null; then
  kill -- -$build_pid 2>/dev/null || true
  log "llama-bench not built by +${BUILD_DEADLINE}s (stopped at: $(tail -c 300 "$OUT/native-build.log" | tr '\r' '\n' | grep -o '\[[0-9]*/[0-9]*\]' | tail -1)): pyllm alone"
elif wait $build_pid; then
  native_ok=1
else
  log "llama-bench build failed: see native-configure.log / native-build.log"
fi

# ---- 4. pyllm bench vs llama-bench ----
if [ "$DRY" = 1 ]; then
  bench=(-p 64 -n 16 -d 0,256 -ngl 0 -r 1); rounds=1
else
  bench=(-p 512 -n 128 -d 0,8192 -ngl 99 -r 3); rounds=2
fi
if [ "$native_ok" = 1 ]; then
  python3 benchmarks/compare_native.py -m "$MODEL" --native-bin "$NATIVE_BUILD/bin/llama-bench" --kv f16,q8_0,q4_0 \
    -fa on "${bench[@]}" --rounds $rounds --out "$OUT" | tee "$OUT/summary.md"
else
  for kv in f16 q8_0 q4_0; do
    (cd /tmp && "${PYLLM[@]}" bench -m "$MODEL" -ctk $kv -ctv $kv -fa on "${bench[@]}" -o md --no-progress) \
      | tee -a "$OUT/pyllm-only.md"
  done
fi
log "done: tables in $OUT (ratios.md or pyllm-only.md, native.json, pyllm.json, gpu-tests.txt, plan.txt)"
[ "$native_ok" = 1 ] || exit 3
exit $tests_rc
