#!/bin/bash
# On the GPU machine: install the carried wheels, run the GPU tests, then the benchmark.
#   bench/gpu_run.sh <size_gib> <iters> [pytest -k expr]
# TEST_S caps the tests, BUDGET_S the whole script (the benchmark gets what is left).
set -u
SIZE=${1:-16}; ITERS=${2:-5}; K=${3:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.free --format=csv | tee "$OUT/gpus.csv"
python3 -c "import torch,grpc,google.protobuf as p,zmq,structlog;print(torch.__version__,grpc.__version__,p.__version__)"
timeout "${TEST_S:-240}" python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_broadcast.py tests/unit/test_pipeline.py \
  ${K:+-k "$K"} --basetemp=/tmp/gt 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
for f in /tmp/gt/*/logs/agent-g.log /tmp/gt/*/*/logs/agent-g.log; do [ -f "$f" ] && tail -c 3000 "$f"; done > "$OUT/gpu_test_agent_tail.log" 2>/dev/null
LEFT=$(( ${BUDGET_S:-575} - SECONDS )); echo "bench: ${LEFT}s left"
timeout "$LEFT" python3 -m bench.run --size-gib "$SIZE" --iters "$ITERS" --out "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
tail -40 "$OUT/bench.err"
for f in /tmp/ckpt-bench-*/ckptd/logs/agent.log; do tail -c 4000 "$f"; done > "$OUT/bench_agent_tail.log" 2>/dev/null
