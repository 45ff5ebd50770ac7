"""ckptd's configuration: one frozen dataclass, every env var declared here."""

from __future__ import annotations

import os
from dataclasses import dataclass

STATE_DIR_ENV = "CKPTD_STATE_DIR"
LISTEN_ENV = "CKPTD_LISTEN"


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    listen: str = "127.0.0.1:7601"
    state_dir: str = os.path.expanduser("~/.local/state/ckptd")
    heartbeat_s: float = 2.0
    command_timeout_s: float = 30.0  # small agent commands (scan, drop, prepare)
    load_timeout_s: float = 600.0  # loading a push into host memory
    update_timeout_s: float = 300.0  # a whole update job, default
    receiver_timeout_s: float = 60.0  # for an engine to connect to its agent worker
    max_bucket_bytes_cpu: int = 64 << 20
    max_bucket_bytes_cuda: int = 512 << 20
    nbuf: int = 2
    port_file: str = ""  # write the bound port here once serving
    metrics_listen: str = ""  # host:port for Prometheus /metrics; "": off

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.nbuf < 1:
            raise ValueError("nbuf must be at least 1")
        for name in ("command_timeout_s", "load_timeout_s", "update_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
