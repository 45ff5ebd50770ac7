"""Where an agent worker listens for its engine: one ipc:// socket per device."""

from __future__ import annotations

import hashlib
import os
import re

IPC_DIR_ENV = "CKPT_IPC_DIR"
DEFAULT_IPC_DIR = "/tmp/ckpt-ipc"


def ipc_dir(override: str | None = None) -> str:
    return override or os.environ.get(IPC_DIR_ENV) or DEFAULT_IPC_DIR


def ensure_private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def worker_endpoint(node_id: str, device: int, directory: str | None = None) -> str:
    """The ZMQ endpoint of the agent worker for (node, device): one-to-one with the pair (a
    digest of the node id; its readable part is only a hint)."""
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:12]
    name = f"{safe(node_id)[:24]}-{digest}-{device}.sock"
    return f"ipc://{os.path.join(ipc_dir(directory), name)}"


def endpoint_refusal(endpoint: str, directory: str | None = None) -> str:
    """Why an engine must not connect to `endpoint`; "". Only an agent worker's socket: an
    ipc:// path directly inside the IPC dir (after resolving links), named *.sock."""
    if not endpoint.startswith("ipc://") or "\x00" in endpoint:
        return "only ipc:// endpoints of the local agent are accepted"
    path = endpoint[len("ipc://") :]
    base = os.path.realpath(ipc_dir(directory))
    real = os.path.realpath(path)
    if os.path.dirname(real) != base or not real.endswith(".sock"):
        return f"the endpoint is not an agent socket in {base}"
    return ""
