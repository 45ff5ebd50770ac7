"""The agent's tunables that are not flags: read once from the environment when the agent
starts (a bad value stops it there, naming the variable, never an update later), handed to
each worker in its WorkerSpec and installed there at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

STEP_TIMEOUT_ENV = "CKPT_STEP_TIMEOUT_S"  # base seconds of one pipeline step
LOAD_THREADS_ENV = "CKPT_LOAD_THREADS"  # threads one store load reads with
P2P_TIMEOUT_ENV = "CKPT_P2P_TIMEOUT_S"  # deadline of one P2P read (Mooncake's, min 5)
STEP_S = 5.0
P2P_TIMEOUT_S = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class Tunables:
    step_timeout_s: float = STEP_S
    load_threads: int = 0  # 0: up to 8, one per CPU
    p2p_timeout_s: int = P2P_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.step_timeout_s > 0:
            raise ValueError(f"{STEP_TIMEOUT_ENV} must be positive, not {self.step_timeout_s}")
        if self.load_threads < 0:
            raise ValueError(f"{LOAD_THREADS_ENV} must not be negative, not {self.load_threads}")
        if self.p2p_timeout_s <= 0:
            raise ValueError(f"{P2P_TIMEOUT_ENV} must be positive, not {self.p2p_timeout_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Tunables:
        def read(name: str, kind: type, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                return kind(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r}: not a {kind.__name__}") from None

        return cls(
            step_timeout_s=read(STEP_TIMEOUT_ENV, float, STEP_S),
            load_threads=int(read(LOAD_THREADS_ENV, int, 0)),
            p2p_timeout_s=int(read(P2P_TIMEOUT_ENV, int, P2P_TIMEOUT_S)),
        )

    def threads(self) -> int:
        return self.load_threads or max(1, min(8, os.cpu_count() or 1))


_current: Tunables | None = None


def install(t: Tunables) -> None:
    """This process's tunables (a worker's, from its spec)."""
    global _current
    _current = t


def current() -> Tunables:
    """This process's tunables: installed, else read from the environment once."""
    global _current
    if _current is None:
        _current = Tunables.from_env()
    return _current
