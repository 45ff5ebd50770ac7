"""Real vLLM OpenAI servers for tests: tiny local models, loopback, the ckptd extension."""

from __future__ import annotations

import json
import socket
import urllib.request

from tests.cluster import Cluster, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(
    c: Cluster,
    name: str,
    model_dir: str,
    *,
    tp: int = 1,
    bind: str = "",
    extra_env: dict | None = None,
) -> str:
    port = free_port()
    env = {
        **c.env,
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_CPU_OMP_THREADS_BIND": bind or "all",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra_env or {}),
    }
    saved, c.env = c.env, env
    try:
        c._spawn(
            name,
            [
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
                "--dtype",
                "float32",
                "--max-model-len",
                "256",
                "--enforce-eager",
                "--tensor-parallel-size",
                str(tp),
                "--max-num-seqs",
                "8",
            ],
        )
    finally:
        c.env = saved
    return f"http://127.0.0.1:{port}"


def healthy(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/health", timeout=2)
        return True
    except Exception:
        return False


def wait_healthy(c: Cluster, name: str, url: str, timeout: float = 300) -> None:
    def ok() -> bool:
        p = c.procs.get(name)
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{name} exited: {c.log(name)[-3000:]}")
        return healthy(url)

    wait_for(ok, timeout, f"{name} to serve", interval=0.5)


def complete(url: str, prompt: list[int], n: int = 8, timeout: float = 120) -> list[int]:
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
