"""An update group's TCPStore as a worker sees it: served by the group's rank 0 (on the
agent's --host), reached by the others in short, abortable attempts, and kept up by its
host until every rank is out."""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.backends.base import RENDEZVOUS_S
from ckpt_agent.group_abort import Abort
from ckpt_agent.host_store import StoreError

if TYPE_CHECKING:
    import torch.distributed as dist

log = structlog.get_logger("ckpt_agent.group_store")
CONNECT_SLICE_S = 0.5  # one attempt to reach the group's store (then the abort is looked at)
STORE_CONNECT_S = 6.0  # the group's store is up (PrepareGroup) before any rank connects
DONE_KEY = "finished"  # ranks that ended the update (the store's host waits for them)
LINGER_S = 3.0


def finished(store: dist.Store, world: int, wait: bool) -> None:
    """Counts this rank out of the group; the rank serving the store keeps it up until every
    rank is out (at most LINGER_S, and only after an update that succeeded here): a peer
    still finishing must not see the store vanish and take it for a failure."""
    try:
        n = int(store.add(DONE_KEY, 1))
        deadline = time.monotonic() + LINGER_S
        while wait and n < world and time.monotonic() < deadline:
            time.sleep(0.01)
            n = int(store.add(DONE_KEY, 0))
    except Exception as e:  # the store is gone: nothing to keep up
        log.info("group_store_gone", error=repr(e))


def group_key(m: apb.PrepareGroup | apb.RunUpdate) -> str:
    """A job's group (a job runs one per class of a shard-aware update)."""
    group = m.group if isinstance(m, apb.PrepareGroup) else m.rendezvous.group
    return f"{m.job_id}/{group}" if group else m.job_id


def serve_store(host: str, world_size: int) -> dist.TCPStore:
    """The group's store, served by this rank (PrepareGroup): it listens on the agent's
    --host only, on a socket bound there and handed over."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=timedelta(seconds=RENDEZVOUS_S),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),  # the store owns (and closes) it
    )


def store_client(u: apb.Rendezvous, abort: Abort | None = None) -> dist.TCPStore:
    """A client of the group's store: connects within STORE_CONNECT_S, in short attempts
    so an abort ends the wait (a store whose host is gone refuses connections)."""
    import torch.distributed as dist

    deadline = time.monotonic() + STORE_CONNECT_S
    while True:
        try:
            st = dist.TCPStore(
                u.master_addr,
                u.master_port,
                u.world_size,
                is_master=False,
                timeout=timedelta(seconds=CONNECT_SLICE_S),
            )
            st.set_timeout(timedelta(seconds=RENDEZVOUS_S))
            return st
        except (RuntimeError, OSError) as e:  # DistStoreError is a RuntimeError
            if abort is not None and abort.is_set():
                raise StoreError("ABORTED", abort.reason) from None
            if time.monotonic() > deadline:
                raise StoreError(
                    "UNAVAILABLE",
                    f"the group's store {u.master_addr}:{u.master_port} did not answer "
                    f"within {STORE_CONNECT_S:g}s: {e}",
                ) from None
