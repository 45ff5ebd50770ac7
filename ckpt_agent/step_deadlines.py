"""How long each step of one rank's update may take (pipeline.py): derived from the bytes the
step moves, capped by the job's end, so a frozen or dead peer is noticed in seconds."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import tunables

STEP_RATE = 100e6  # bytes/s a step moves at the least (its deadline grows with its size)
DONE_RATE = 1e9  # bytes/s of the engine's post-load processing at the least


@dataclass(frozen=True, kw_only=True)
class StepDeadlines:
    """Seconds each step of one update may take: a frozen or dead peer (engine, rank) is
    noticed after one step's deadline, never the whole job's. Capped by the job's end."""

    base_s: float
    job_end: float  # time.monotonic() at which the whole job must be over
    first_s: float  # the first agreement also waits for every engine to connect

    def __post_init__(self) -> None:
        if self.base_s <= 0:
            raise ValueError("a step's base deadline must be positive")

    @staticmethod
    def for_update(cmd: apb.RunUpdate, t0: float) -> StepDeadlines:
        base = tunables.current().step_timeout_s
        return StepDeadlines(
            base_s=base,
            job_end=t0 + cmd.deadlines.timeout_s,
            first_s=cmd.deadlines.receiver_timeout_s + 2 * base,
        )

    def _cap(self, s: float) -> float:
        return max(0.1, min(s, self.job_end - time.monotonic()))

    def engine(self, nbytes: int) -> float:
        """The engine loading one bucket."""
        return self._cap(self.base_s + nbytes / STEP_RATE)

    def engine_done(self, nbytes: int) -> float:
        """The engine's post-load processing (after the last bucket)."""
        return self._cap(self.base_s + nbytes / DONE_RATE)

    def collective(self, nbytes: int) -> float:
        """One agreement + broadcast: a peer may first wait for its own engine's step."""
        return self._cap(2 * self.base_s + 2 * nbytes / STEP_RATE)
