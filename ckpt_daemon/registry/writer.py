"""The registry's database writes, off its lock: each call's statements (plain values,
taken while the registry's lock was held) are queued in the order the calls changed memory
and applied by one thread, one transaction per call. The caller waits for its own after
letting the lock go, so a reader of the registry never waits for the disk (a 100k-tensor
version is inserted while every other call is answered)."""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import structlog

log = structlog.get_logger("ckptd.registry")

# (many, statement, parameters: one row, or a list of rows when many)
Statement = tuple[bool, str, Sequence[Any]]


class DbWriter:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._q: queue.SimpleQueue[tuple[Any, Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="registry-db", daemon=True)
        self._thread.start()

    def submit(self, batch: list[Statement]) -> Future[Any]:
        """Queues one call's statements, applied as one transaction."""
        fut: Future[Any] = Future()
        self._q.put((batch, fut))
        return fut

    def call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Runs fn on the writer's thread after every write queued before it; its result."""
        fut: Future[Any] = Future()
        self._q.put((fn, fut))
        return fut.result()

    def close(self) -> None:
        fut: Future[Any] = Future()
        self._q.put((None, fut))
        fut.result()
        self._thread.join(10)
        self._db.close()

    def _run(self) -> None:
        while True:
            work, fut = self._q.get()
            if work is None:
                fut.set_result(None)
                return
            try:
                fut.set_result(work(self._db) if callable(work) else self._apply(work))
            except BaseException as e:  # the caller gets it
                log.error("registry_write_failed", error=repr(e))
                fut.set_exception(e)

    def _apply(self, batch: list[Statement]) -> None:
        if not batch:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            for many, stmt, params in batch:
                if many:
                    db.executemany(stmt, params)
                else:
                    db.execute(stmt, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
