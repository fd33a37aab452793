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
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/steps.log"; }
JOBS=$(nproc)

# ---- 1. python packages, offline ----
if [ "$DRY" = 0 ]; then
  wheels=$(ls .whl/*.whl dist/pyllm-*.whl 2>/dev/null || true)
  [ -n "$wheels" ] || { log "no wheels in .whl/ or dist/: build the CUDA wheel first (README)"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
  nvidia-smi > "$OUT/gpu.txt" 2>&1 || true
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
  NATIVE_BUILD=$ROOT/build/native
  cmake_args=()
else
  cmake_args=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-native}"
              "-DGGML_CUDA_FA_QUANTS=f16-f16;q8_0-q8_0;q4_0-q4_0" -DGGML_NATIVE=OFF)
  # the same kernel set and CUDA options as the wheel (its build options are in info.json)
  if python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["cuda_vmm"] is False else 1)' "$OUT/info.json"; then
    cmake_args+=(-DGGML_CUDA_NO_VMM=ON)
  fi
fi
log "building llama-bench in $NATIVE_BUILD (${cmake_args[*]:-cpu})"
( cmake -S benchmarks/native -B "$NATIVE_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release "${cmake_args[@]}" > "$OUT/native-configure.log" 2>&1 &&
  cmake --build "$NATIVE_BUILD" --target llama-bench -j "$JOBS" > "$OUT/native-build.log" 2>&1 ) &
build_pid=$!

# ---- 3. model + gpu tests (while llama-bench compiles) ----
MODEL=${MODEL:-/tmp/pyllm-gpu-check.gguf}
if [ "$DRY" = 1 ]; then
  python3 tests/synthetic_gguf.py llama "$MODEL" n_embd=256 n_layer=4 n_head=8 n_head_kv=2 n_ff=512 > /dev/null
else
  python3 tests/synthetic_gguf.py llama "$MODEL" n_embd=1024 n_layer=16 n_head=16 n_head_kv=4 n_ff=4096 n_ctx_train=32768 > /dev/null
fi
log "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
set +e
PYLLM_GPU_MODEL=$MODEL python3 -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  --import-mode=importlib tests/gpu -ra --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
tests_rc=$?
set -e
log "gpu tests: rc=$tests_rc, $(tail -1 "$OUT/gpu-tests.txt")"

wait $build_pid || { log "llama-bench build failed: see native-build.log"; exit 1; }
log "llama-bench built"

# ---- 4. pyllm bench vs llama-bench ----
if [ "$DRY" = 1 ]; then
  bench=(-p 64 -n 16 -d 0,256 -ngl 0 -r 1 --rounds 1)
else
  bench=(-p 512 -n 128 -d 0,8192 -ngl 99 -r 3 --rounds 2)
fi
python3 benchmarks/compare_native.py -m "$MODEL" --native-bin "$NATIVE_BUILD/bin/llama-bench" --kv f16,q8_0,q4_0 \
  -fa on "${bench[@]}" --out "$OUT" | tee "$OUT/summary.md"
log "done: tables in $OUT (ratios.md, native.json, pyllm.json, gpu-tests.txt)"
exit $tests_rc
