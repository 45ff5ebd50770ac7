"""Where an agent worker listens for its engine: one ipc:// socket per device, in a directory
only the agent's user can write (ckpt_common.rendezvous says who else may connect)."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from ckpt_common.rendezvous import MAX_SOCKET_PATH, RendezvousError, dir_refusal, trusted_uids

IPC_DIR_ENV = "CKPT_IPC_DIR"
ROOT_IPC_DIR = "/run/ckpt"
RUNTIME_DIR_ENV = "XDG_RUNTIME_DIR"


def default_ipc_dir() -> str:
    """Never under a directory everyone can write: /run/ckpt for root, else
    $XDG_RUNTIME_DIR/ckpt (the user's own runtime dir), else ~/.ckpt/ipc."""
    if os.geteuid() == 0:
        return ROOT_IPC_DIR
    runtime = os.environ.get(RUNTIME_DIR_ENV, "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "ckpt")
    return os.path.join(os.path.expanduser("~"), ".ckpt", "ipc")


def ipc_dir(override: str | None = None) -> str:
    return override or os.environ.get(IPC_DIR_ENV) or default_ipc_dir()


def path_length_problem(endpoint: str) -> str:
    """Why an ipc:// endpoint would not fit a unix socket path, or ""."""
    n = len(endpoint.removeprefix("ipc://").encode())
    if n > MAX_SOCKET_PATH:
        return (
            f"the socket path {endpoint} is too long for a unix socket ({n} > "
            f"{MAX_SOCKET_PATH} bytes): choose a shorter {IPC_DIR_ENV}"
        )
    return ""


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
    ipc:// path directly inside the IPC dir (after resolving links), named *.sock, in a
    directory a trusted uid owns and nobody else can write (ckpt_common.rendezvous)."""
    if not endpoint.startswith("ipc://") or "\x00" in endpoint:
        return "only ipc:// endpoints of the local agent are accepted"
    path = endpoint[len("ipc://") :]
    base = os.path.realpath(ipc_dir(directory))
    real = os.path.realpath(path)
    if os.path.dirname(real) != base or not real.endswith(".sock"):
        return f"the endpoint is not an agent socket in {base}"
    return socket_dir_refusal(endpoint)


def socket_dir_refusal(endpoint: str) -> str:
    """Why the directory of an ipc:// endpoint is not one a trusted agent alone controls."""
    try:
        why = dir_refusal(os.path.dirname(endpoint.removeprefix("ipc://")), trusted_uids())
    except RendezvousError as e:
        why = str(e)
    return f"refusing the agent socket {endpoint}: {why}" if why else ""


# ZMTP heartbeats on the hand-off socket, both ends: libzmq's I/O thread answers pings
# without the GIL, so only a process that is stopped (SIGSTOP, a frozen node) or gone stops
# answering; its connection is then closed, and the other end sees a disconnect (a frozen
# engine becomes a gone engine within HEARTBEAT_TIMEOUT_MS; a frozen worker likewise).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


def keepalive(sock: Any) -> None:
    """Heartbeats on a ZMQ socket (set before it binds or connects)."""
    import zmq

    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
