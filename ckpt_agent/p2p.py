"""The transfer engine (Mooncake): register host stores for peers, read peers' stores.

RDMA where the node has NICs (chosen per device, ckpt_agent/nic.py), TCP otherwise (CI).
No metadata server: P2PHANDSHAKE, a session is "host:rpc_port".

Bounds (measured with mooncake-transfer-engine 0.3.13 over TCP, see docs/P2P.md): a dead
owner fails a read at once; a frozen owner after MC_TCP_PROGRESS_TIMEOUT_SEC (idle) seconds;
the whole read is bounded by MC_TRANSFER_TIMEOUT (min 5 s). The TCP timeouts are kept below
the transfer timeout so a read that timed out never writes into our buffer later. A first
contact with a frozen peer blocks for Mooncake's fixed 60 s handshake timeout.
"""

from __future__ import annotations

import os
import threading

import structlog

from ckpt_agent import tunables
from ckpt_agent.nic import available_hcas, nics_for_device

log = structlog.get_logger("ckpt_agent.p2p")

_DEFAULTS = {
    "MC_LOG_LEVEL": "ERROR",
    "MC_TCP_PROGRESS_TIMEOUT_SEC": "3",
    "MC_TCP_STATUS_TIMEOUT_SEC": "3",
}


class P2PError(Exception):
    pass


def available() -> bool:
    try:
        import mooncake.engine  # noqa: F401
    except Exception:
        return False
    return True


class P2PEngine:
    def __init__(self, host: str, device: int) -> None:
        for k, v in _DEFAULTS.items():
            os.environ.setdefault(k, v)
        timeout = tunables.current().p2p_timeout_s
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(5, timeout)))
        from mooncake.engine import TransferEngine

        nics = nics_for_device(device, dict(os.environ), available_hcas())
        self._te = TransferEngine()
        rc = self._te.initialize(
            f"{host}:0", "P2PHANDSHAKE", "rdma" if nics else "tcp", ",".join(nics)
        )
        if rc != 0:
            raise P2PError(f"transfer engine failed to start (rc={rc})")
        self.session = f"{host}:{self._te.get_rpc_port()}"
        self._registered: dict[int, int] = {}
        self._lock = threading.Lock()
        log.info("p2p_engine_started", session=self.session, nics=nics or "auto")

    def register(self, addr: int, nbytes: int) -> None:
        with self._lock:
            if self._registered.get(addr) == nbytes:
                return
            if addr in self._registered:
                self._te.unregister_memory(addr)
            rc = self._te.register_memory(addr, max(1, nbytes))
            if rc != 0:
                raise P2PError(f"registering {nbytes} bytes failed (rc={rc})")
            self._registered[addr] = nbytes

    def unregister(self, addr: int) -> None:
        with self._lock:
            if self._registered.pop(addr, None) is not None:
                self._te.unregister_memory(addr)

    def read(self, session: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        if not local:
            return
        rc = self._te.batch_transfer_sync_read(session, local, remote, lengths)
        if rc != 0:
            raise P2PError(f"reading {sum(lengths)} bytes from {session} failed (rc={rc})")
