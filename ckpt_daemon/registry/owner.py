"""The registry's one owner and its writes: the thread that made the registry (the event
loop's) is the only one that reads or writes it. A write changes memory at once and queues
its statements for the database thread (writer.DbWriter) as one transaction, in the order
of the calls, so the loop never waits for the disk; `await synced()` waits until what was
written is on disk (a write made with no loop running, by a script or a test, waits
itself). After each write a frozen view is published for other threads."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from ckpt_daemon.registry.view import RegistryView
from ckpt_daemon.registry.writer import DbWriter, Statement

F = TypeVar("F", bound=Callable[..., Any])


def writes(method: F) -> F:
    """A call that writes: on the owner's thread only; its statements (_sql) are queued as one
    transaction once it returns (a call made inside another joins the outer call's); a call
    that raises queues nothing (its checks come before it touches memory); the view is
    published again."""

    @functools.wraps(method)
    def call(self: Owned, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self._owner:
            raise RuntimeError(f"Registry.{method.__name__} called off the registry's thread")
        if self._batch is not None:
            return method(self, *args, **kwargs)
        self._batch = []
        try:
            result = method(self, *args, **kwargs)
        except BaseException:
            self._batch = None
            raise
        batch, self._batch = self._batch, None
        if batch:
            self._last = self._writer.submit(batch)
            if not _on_a_loop():  # a script or test: no reply to hold back, wait here
                self._last.result()
        self._publish()
        return result

    return call  # type: ignore[return-value]


def _on_a_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Owned:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._owner = threading.get_ident()
        self._batch: list[Statement] | None = None
        self._last: Future[Any] | None = None
        self._writer = DbWriter(db)  # the only user of the connection from here on
        self.view = RegistryView()

    def _publish(self) -> None:
        """Builds and publishes self.view (the registry's)."""

    def _sql(self, stmt: str, params: Sequence[Any] = ()) -> None:
        assert self._batch is not None, "_sql outside a @writes call"
        self._batch.append((False, stmt, params))

    def _sql_many(self, stmt: str, rows: Sequence[Any]) -> None:
        assert self._batch is not None, "_sql_many outside a @writes call"
        self._batch.append((True, stmt, rows))

    async def synced(self) -> None:
        """Waits until every write made so far is on disk."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.wrap_future(last)

    def flush(self) -> None:
        """synced(), blocking: for a thread with no loop (tests, shutdown)."""
        if self._last is not None:
            self._last.result()

    def close(self) -> None:
        self._writer.close()
