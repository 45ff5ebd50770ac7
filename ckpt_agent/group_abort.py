"""An update's abort, with its reason, and how the ranks of a group learn of each other's
failures at once: a failing rank publishes its reason under one key of the group's store, and
every rank watches that key (its own connection, a daemon thread) and trips its abort. Waits
in the pipeline poll the abort, so no rank stays in a collective or an engine wait once any
rank has given up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ckpt.v1 import agent_pb2 as apb

if TYPE_CHECKING:
    import torch.distributed as dist

log = structlog.get_logger("ckpt_agent.group_abort")

PEER_FAILED = "another rank failed"  # the words of a failure of origin ORIGIN_PEER
FAILED_KEY = "failed"
POLL_S = 0.2  # how often the key is looked at
STOP_S = 2.0  # how long stop() waits for the watcher thread


class Abort(threading.Event):
    """An Event with the reason it was set for and where that failure began
    (apb.FailureOrigin); the first reason wins."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self.origin: apb.FailureOrigin = apb.ORIGIN_UNSPECIFIED
        self._lock = threading.Lock()

    def trip(self, reason: str, origin: apb.FailureOrigin = apb.ORIGIN_SELF) -> None:
        with self._lock:
            if not self.is_set():
                self.reason, self.origin = reason, origin
                self.set()


class PeerWatch:
    """Publishes this rank's failure to the group and trips `abort` on a peer's.

    connect() returns a fresh client of the group's store (already scoped to the job);
    it is called on the watcher thread, so a store that cannot be reached blocks nobody.
    """

    def __init__(
        self, connect: Callable[[], dist.Store], publish_store: dist.Store, abort: Abort
    ) -> None:
        self._connect = connect
        self._publish_store = publish_store
        self._abort = abort
        self._stop = threading.Event()
        self._mine = ""  # what this rank published
        self._thread = threading.Thread(target=self._run, name="peer-watch", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def publish(self, reason: str) -> None:
        """Tells every rank of the group (the first failure published wins); never blocks."""

        self._mine = reason

        def put() -> None:
            try:
                self._publish_store.compare_set(FAILED_KEY, "", reason)
            except Exception as e:  # the store is gone: peers see the collective fail
                log.warning("failure_not_published", error=repr(e))

        threading.Thread(target=put, name="peer-publish", daemon=True).start()

    def _run(self) -> None:
        try:
            client = self._connect()
        except Exception as e:
            if not self._stop.is_set():
                self._abort.trip(f"cannot reach the group's store: {e}")
            return
        while not self._stop.wait(POLL_S):
            try:
                if not client.check([FAILED_KEY]):  # no blocking wait: it logs each timeout
                    continue
                reason = client.get(FAILED_KEY).decode(errors="replace")
            except Exception as e:
                if not self._stop.is_set():
                    self._abort.trip(f"lost the group's store (its rank 0 is gone?): {e}")
                return
            if not self._stop.is_set() and reason != self._mine:
                self._abort.trip(f"{PEER_FAILED}: {reason}", apb.ORIGIN_PEER)
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_S)


def abort_reason(abort: threading.Event) -> str:
    """Why an update's abort event was set (ckptd's reason, a peer's), or a plain default."""
    return getattr(abort, "reason", "") or "aborted by ckptd"


def abort_origin(abort: threading.Event) -> apb.FailureOrigin:
    """Where the failure that set an update's abort began (apb.FailureOrigin): ckptd's
    abort where the event says nothing else."""
    if not getattr(abort, "reason", ""):
        return apb.ORIGIN_DAEMON
    return getattr(abort, "origin", apb.ORIGIN_UNSPECIFIED) or apb.ORIGIN_DAEMON


def origin_of(abort: threading.Event, why: str) -> apb.FailureOrigin:
    """Where the reason a wait returned began: the abort's where the abort ended the wait,
    else this rank's own."""
    if abort.is_set() and why == abort_reason(abort):
        return abort_origin(abort)
    return apb.ORIGIN_SELF


class UpdateFailed(Exception):
    """An update cannot go on here; `origin` (apb.FailureOrigin): where its failure began."""

    def __init__(self, reason: str, origin: apb.FailureOrigin = apb.ORIGIN_SELF) -> None:
        super().__init__(reason)
        self.origin = origin
