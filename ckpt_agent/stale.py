"""Commands of jobs that already ended are dropped, not executed.

ckptd tells every node of a job that ended badly to abort it; a worker that was frozen (or
whose agent was) finds that Abort queued behind the job's own PrepareGroup and RunUpdate.
So a worker reads every command already waiting in its pipe before acting on one, acts on
the aborts first, and remembers which jobs ended: a later command of an ended job fails at
once (ABORTED) instead of connecting to a group whose peers are long gone. Job ids, not
clocks: a deadline from ckptd's monotonic clock means nothing on another host.
"""

from __future__ import annotations

from collections import OrderedDict
from multiprocessing.connection import Connection

from ckpt.v1 import agent_pb2 as apb

MAX_ENDED = 4096  # job ids remembered (oldest forgotten first)
MAX_BATCH = 256  # commands read ahead of acting on the first one
JOB_COMMANDS = ("prepare_group", "run_update")


class EndedJobs:
    """Job ids that ended (aborted), with why; bounded."""

    def __init__(self, cap: int = MAX_ENDED) -> None:
        self._cap = cap
        self._ids: OrderedDict[str, str] = OrderedDict()

    def end(self, job_id: str, reason: str) -> None:
        if not job_id:
            return
        self._ids.setdefault(job_id, reason)
        while len(self._ids) > self._cap:
            self._ids.popitem(last=False)

    def why(self, job_id: str) -> str | None:
        """Why the job ended, or None while it has not."""
        return self._ids.get(job_id)

    def stale(self, cmd: apb.Command) -> str | None:
        """Why `cmd` must not run: it belongs to a job that ended."""
        kind = cmd.WhichOneof("body")
        if kind not in JOB_COMMANDS:
            return None
        why = self.why(getattr(cmd, kind).job_id)
        if why is None:
            return None
        return f"job {getattr(cmd, kind).job_id} ended before this {kind} ran: {why}"


def read_batch(conn: Connection, first: bytes) -> list[apb.Command]:
    """`first` and every command already waiting behind it, aborts first (each group keeps
    its order). Raises EOFError/OSError as recv_bytes does."""
    cmds = [apb.Command.FromString(first)]
    while len(cmds) < MAX_BATCH and conn.poll(0):
        cmds.append(apb.Command.FromString(conn.recv_bytes()))
    aborts = [c for c in cmds if c.WhichOneof("body") == "abort"]
    return aborts + [c for c in cmds if c.WhichOneof("body") != "abort"]
