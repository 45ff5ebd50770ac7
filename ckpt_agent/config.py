"""ckpt-agent configuration: one frozen dataclass, env vars declared here."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from ckpt_agent.tunables import Tunables
from ckpt_common.credentials import Credentials
from ckpt_common.sources import roots_from_env

DAEMON_ENV = "CKPTD_ADDR"
TRUSTED_FABRIC_ENV = "CKPT_TRUSTED_FABRIC"  # "1": the network between agents is trusted
NODE_ID_ENV = "CKPT_NODE_ID"


@dataclass(frozen=True, kw_only=True)
class StoreOptions:
    """A worker's host stores: how many dropped stores it keeps for the next versions
    (spares), and whether it makes them at start."""

    spares: int | None = None  # None: 1 on CUDA (kept pinned), 0 on CPU
    # > 0: at start, each worker fills its spares with stores of this size (pinned on CUDA)
    # so that the first pushes of a run reuse memory as later ones do
    prealloc_bytes: int = 0

    def __post_init__(self) -> None:
        if self.spares is not None and self.spares < 0:
            raise ValueError("spare stores must not be negative")
        if self.prealloc_bytes < 0:
            raise ValueError("the pre-allocated store size must not be negative")
        if self.prealloc_bytes and self.spares == 0:
            raise ValueError("pre-allocated stores are spares: --spare-stores must not be 0")

    def spares_for(self, kind: str) -> int:
        if self.spares is not None:
            return self.spares
        return 1 if kind == "cuda" else 0


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """What a worker process is started with (the spawn argument of ckpt_agent.worker)."""

    node_id: str
    device: int  # the device's index on this node (CPU: a slot)
    kind: str  # a backend kind (ckpt_agent.backends.BACKENDS)
    ipc_dir: str  # where the engine hand-off socket lives
    host: str  # the agent's --host: group stores, gloo, NCCL, P2P listen there
    log_level: str
    p2p: bool = False  # register host stores with the transfer engine (Mooncake)
    source_roots: tuple[str, ...] = ()  # push sources are read only under these
    stores: StoreOptions = field(default_factory=StoreOptions)
    tunables: Tunables = field(default_factory=Tunables)

    def __post_init__(self) -> None:
        from ckpt_agent.backends.registry import BACKENDS

        if not self.node_id or "/" in self.node_id:
            raise ValueError("node id must be non-empty and without '/'")
        if self.device < 0:
            raise ValueError(f"device index must not be negative, not {self.device}")
        if self.kind not in BACKENDS:
            raise ValueError(f"no backend of kind {self.kind!r}")
        if not self.ipc_dir:
            raise ValueError("a worker needs an IPC directory")
        if not all(os.path.isabs(r) for r in self.source_roots):
            raise ValueError("source roots must be absolute directories")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    daemon: str = "127.0.0.1:7601"
    node_id: str = socket.gethostname()
    host: str = "127.0.0.1"  # address peers reach this node at (rendezvous, P2P)
    device: str = "cpu"  # "cpu" or "cuda"
    slots: int = 1  # CPU: how many "devices" to play; CUDA: 0 means every GPU
    ipc_dir: str = ""
    heartbeat_s: float = 2.0
    command_timeout_s: float = 30.0
    log_level: str = "info"
    p2p: str = "auto"  # register host stores for P2P reads: auto (if Mooncake is installed)
    # Mooncake (P2P) listens on every interface without authentication: it starts only when
    # the operator states that the network between nodes is trusted
    trusted_fabric: bool = field(default_factory=lambda: os.environ.get(TRUSTED_FABRIC_ENV) == "1")
    credentials: Credentials = field(default_factory=Credentials)  # to ckptd: token, TLS
    # push sources are read only under these (ckpt_common.sources); env CKPT_SOURCE_ROOTS
    source_roots: tuple[str, ...] = field(default_factory=roots_from_env)
    stores: StoreOptions = field(default_factory=StoreOptions)
    # CKPT_STEP_TIMEOUT_S, CKPT_LOAD_THREADS, CKPT_P2P_TIMEOUT_S: read once, here
    tunables: Tunables = field(default_factory=Tunables.from_env)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {self.device!r}")
        if self.device == "cpu" and self.slots < 1:
            raise ValueError("--slots must be at least 1 on cpu")
        if not self.node_id or "/" in self.node_id:
            raise ValueError("node id must be non-empty and without '/'")
        if self.p2p not in ("auto", "on", "off"):
            raise ValueError("p2p must be auto, on or off")
        if self.p2p == "on" and not self.trusted_fabric:
            raise ValueError(
                "--p2p on needs --trusted-fabric: Mooncake serves host stores on every "
                "interface without authentication"
            )
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if not self.source_roots or not all(os.path.isabs(r) for r in self.source_roots):
            raise ValueError("source roots must be absolute directories")


def default_daemon() -> str:
    return os.environ.get(DAEMON_ENV, AgentConfig.daemon)
