"""ckptd's configuration: one frozen dataclass, every env var declared here."""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_common.credentials import DEFAULT_STATE_DIR

STATE_DIR_ENV = "CKPTD_STATE_DIR"
LISTEN_ENV = "CKPTD_LISTEN"


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    listen: str = "127.0.0.1:7601"
    state_dir: str = DEFAULT_STATE_DIR
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
    otel_endpoint: str = ""  # OTLP/HTTP traces URL (ckpt_daemon.observe.tracing); "": off
    tls_cert: str = ""  # ckptd's certificate chain (PEM); with tls_key: TLS on the gRPC port
    tls_key: str = ""
    tls_ca: str = ""  # verifies client certificates (agents, clients) when they send one
    auth_file: str = (
        ""  # tokens and client roles (ckpt_daemon.security.auth); "": a local admin token
    )
    insecure: bool = False  # no authentication at all, and plaintext beyond loopback
    engine_token_file: str = ""  # sent to vLLM engines (vllm_ext.guard); "": none
    drain_s: float = 20.0  # on SIGTERM: running jobs get this long to end before cancelled
    host_deltas: bool = True  # diff READY versions in the host stores (push/deltas.py)

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.nbuf < 1:
            raise ValueError("nbuf must be at least 1")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for name in ("command_timeout_s", "load_timeout_s", "update_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
