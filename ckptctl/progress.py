"""Following work while it runs: a job (update, join) from ckptd's WatchJob stream, a push by
polling its checkpoint. On a terminal: a progress bar with bytes, rate and time left (on
stderr, so stdout stays the result); else one line per change. Ctrl-C stops the following,
never the work: it says so, and how to go on or stop it (exit 130)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.client import TERMINAL, Client
from ckpt_common.errors import CkptError
from ckptctl.term import console, markup
from ckptctl.views import delivered, job_line, job_state

EXIT_INTERRUPTED = 130
POLL_S = 0.25


class Bar:
    """A progress bar on stderr when it is a terminal (and shown), else lines (when shown)."""

    def __init__(self, what: str, show: bool) -> None:
        self._con = console(sys.stderr)
        self.live = show and self._con.is_terminal
        self.lines = show and not self.live
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._con,
            transient=False,
        )
        self._task = self._progress.add_task(what, total=None)

    def __enter__(self) -> Bar:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._progress.stop()

    def update(self, done: int, total: int, description: str | None = None) -> None:
        kw: dict[str, Any] = {"completed": done, "total": total or None}
        if description:
            kw["description"] = description
        self._progress.update(self._task, **kw)

    def line(self, text: str) -> None:
        if self.lines:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def interrupted(message: str) -> Iterator[None]:
    """Ctrl-C: says what goes on without us (message), exits 130."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted: {message}", file=sys.stderr, flush=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def follow_job(c: Client, job: tpb.Job, timeout_s: float, show: bool) -> tpb.Job:
    """The job once it ended, or as it is after timeout_s of following."""
    last = job
    message = (
        f"job {job.id} keeps running; `ckptctl watch {job.id}` follows it, "
        f"`ckptctl cancel {job.id}` stops it"
    )
    with interrupted(message), Bar(f"job {job.id}", show) as bar:
        for last in c.watch(job.id, timeout_s):
            state = markup(job_state(last))
            bar.update(delivered(last), last.bytes_total, f"job {last.id} {state}")
            bar.line(job_line(last))
            if last.state in TERMINAL:
                break
    return last if last.state in TERMINAL else c.job(job.id)


def follow_push(
    c: Client, name: str, version: int, push: Callable[[], tpb.Checkpoint], show: bool
) -> tpb.Checkpoint:
    """Runs push (a blocking PushCheckpoint) while showing the version's shards load."""
    ref = f"{name}@{version}"
    message = (
        f"ckptd goes on loading {ref}; `ckptctl get checkpoints {name}` shows it, "
        f"`ckptctl delete checkpoint {ref}` removes it"
    )
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["cp"] = push()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    worker = threading.Thread(target=run, name="push", daemon=True)  # Ctrl-C: not joined
    with interrupted(message), Bar(f"push {ref}", show) as bar:
        worker.start()
        seen = -1
        while worker.is_alive():
            seen = _poll_push(c, name, version, bar, seen)
            worker.join(POLL_S)
        if "error" in box:
            raise box["error"]
        cp: tpb.Checkpoint = box["cp"]
        _show_push(bar, cp, seen)
        return cp


def _poll_push(c: Client, name: str, version: int, bar: Bar, seen: int) -> int:
    """Shows the bytes of the version's shards that are ready; returns that number."""
    try:
        cp = c.get(name, version)
    except CkptError:  # not registered yet
        return seen
    return _show_push(bar, cp, seen)


def _show_push(bar: Bar, cp: tpb.Checkpoint, seen: int) -> int:
    done = sum(s.nbytes for s in cp.shards if s.state == tpb.SHARD_READY)
    bar.update(done, cp.total_bytes)
    if done != seen:
        bar.line(f"push {cp.name}@{cp.version}: {done}/{cp.total_bytes} bytes ready "
                 f"({time.strftime('%H:%M:%S')})")  # fmt: skip
    return done
