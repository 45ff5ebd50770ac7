"""Starting and talking to a vLLM OpenAI server with the ckptd extension (demo and tests)."""

from __future__ import annotations

import json
import socket
import sys
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(base: dict, *, bind: str = "", extra: dict | None = None) -> dict:
    """vLLM CPU settings: a small KV cache (else it reserves 12 GiB), dev endpoints on;
    bind: VLLM_CPU_OMP_THREADS_BIND ("0", "0|1" for TP=2; empty: vLLM's default)."""
    env = {
        **base,
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }
    if bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def vllm_command(model_dir: str, port: int, *, tp: int = 1, extension: bool = True) -> list[str]:
    """extension=False: no worker extension (an engine on the `ckptd` weight-transfer
    backend, vLLM's native API, needs none)."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        "m",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-extension-cls",
        "vllm_ext.WorkerExtension",
        "--scheduler-cls",
        "vllm_ext.ProbeScheduler",
        "--middleware",
        "vllm_ext.guard.CkptGuard",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--tensor-parallel-size",
        str(tp),
        "--max-num-seqs",
        "8",
    ]
    if not extension:
        at = cmd.index("--worker-extension-cls")
        del cmd[at : at + 2]
    return cmd


def healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2)
        return True
    except Exception:
        return False


def complete(url: str, prompt: list[int], n: int = 8, timeout: float = 120) -> list[int]:
    """Greedy completion of n tokens; returns the token ids."""
    body = json.dumps(
        {
            "model": "m",
            "prompt": prompt,
            "max_tokens": n,
            "min_tokens": n,
            "temperature": 0,
            "return_token_ids": True,
        }
    ).encode()
    req = urllib.request.Request(
        f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return list(out["choices"][0]["token_ids"])
