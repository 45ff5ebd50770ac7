#!/bin/bash
# On the GPU machine: GPU tests, the H2D/NCCL ceilings, then bench.shard_bench.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_broadcast.py tests/unit/test_pipeline.py --basetemp=/tmp/gt 2>&1 | tail -15
timeout 120 python3 -m bench.ceilings --gpus 1 --out "$OUT/ceilings.json" 2>&1 | tail -5
timeout 360 python3 -m bench.shard_bench --size-gib 8 --tp 1,2,4,8 --iters 3 --out "$OUT/shard.json" 2>"$OUT/shard.err" | tee "$OUT/shard.txt"
tail -30 "$OUT/shard.err"
for f in /tmp/ckpt-shard-bench-*/tp*/logs/agent.log; do echo "== $f"; grep -i "error\|fail" "$f" | tail -5 | cut -c1-600; done > "$OUT/agent_err.log" 2>/dev/null
