#!/bin/bash
# On the GPU machine: the direct-push GPU tests, then bench.rl_step (a new version every
# step from the trainer's GPU memory to the engine serving it; checkpoint-engine's step in
# the same run when its wheel is carried).
#   bench/gpu_rl_step.sh [size_gib] [steps] [bench.rl_step options, e.g. --serial]
# TEST_S caps the tests, BUDGET_S the whole script (the benchmark gets what is left).
set -u
SIZE=${1:-16}; STEPS=${2:-10}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv | tee "$OUT/gpus.csv"
timeout "${TEST_S:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_broadcast.py tests/gpu/test_gpu_delta.py \
  tests/proc/test_integrity.py -k "direct_push or checksum" --basetemp=/tmp/gt 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
TESTS_RC=${PIPESTATUS[0]}
for f in /tmp/gt/*/logs/agent-g.log /tmp/gt/*/*/logs/agent-g.log; do [ -f "$f" ] && tail -c 3000 "$f"; done > "$OUT/gpu_test_agent_tail.log" 2>/dev/null
# STOP_ON_FAIL=1: no benchmark on a build whose GPU tests failed
if [ "$TESTS_RC" != 0 ] && [ -n "${STOP_ON_FAIL:-}" ]; then echo "GPU tests failed (rc $TESTS_RC)"; exit 1; fi
LEFT=$(( ${BUDGET_S:-575} - SECONDS )); echo "bench: ${LEFT}s left"
timeout "$LEFT" python3 -m bench.rl_step --size-gib "$SIZE" --steps "$STEPS" "${@:3}" --out "$OUT/rl_step.json" \
  2>"$OUT/rl_step.err" | tee "$OUT/rl_step.txt"
tail -40 "$OUT/rl_step.err"
# SHARD_TP=2,8: then bench.shard_bench on those TP layouts (8 GiB), a trainer-pushed version's
# first shard-aware update (part checksums taken by the trainer) against a repeat.
if [ -n "${SHARD_TP:-}" ]; then
  LEFT=$(( ${SHARD_BUDGET_S:-590} - SECONDS )); echo "shard_bench: ${LEFT}s left"
  timeout "$LEFT" python3 -m bench.shard_bench --size-gib 8 --tp "$SHARD_TP" --iters 3 \
    --out "$OUT/shard.json" 2>"$OUT/shard.err" | tee "$OUT/shard.txt"
  grep -i "trainer version\|error" "$OUT/shard.err" | tail -10
fi
