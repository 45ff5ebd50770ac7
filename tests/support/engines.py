"""Real vLLM OpenAI servers for tests: tiny local models, loopback, the ckptd extension."""

from __future__ import annotations

from demo.engines import complete, free_port, healthy, vllm_command, vllm_env
from tests.support.cluster import Cluster, wait_for
from vllm_ext.guard import TOKEN_FILE_ENV as ENGINE_KEY_ENV

__all__ = ["complete", "start_vllm", "wait_healthy"]


def start_vllm(
    c: Cluster,
    name: str,
    model_dir: str,
    *,
    tp: int = 1,
    bind: str = "",
    extra_env: dict | None = None,
    extra_args: list[str] | None = None,
    extension: bool = True,
    instance: str = "",
) -> str:
    """instance: the name the engine is registered under (default: `name` less "vllm-"):
    its guard holds that instance's key."""
    port = free_port()
    key = c.engine_key_file(instance or name.removeprefix("vllm-"))
    extra = {ENGINE_KEY_ENV: str(key), **(extra_env or {})}
    saved, c.env = c.env, vllm_env(c.env, bind=bind, extra=extra)
    try:
        cmd = vllm_command(model_dir, port, tp=tp, extension=extension)
        c._spawn(name, cmd[1:] + (extra_args or []))
    finally:
        c.env = saved
    return f"http://127.0.0.1:{port}"


def wait_healthy(c: Cluster, name: str, url: str, timeout: float = 300) -> None:
    def ok() -> bool:
        p = c.procs.get(name)
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{name} exited: {c.log(name)[-3000:]}")
        return healthy(url)

    wait_for(ok, timeout, f"{name} to serve", interval=0.5)
