"""The phase times one rank reports for an update (tpb.PhaseTimes), host-measured or, on
devices with streams, from timing events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckpt.v1 import types_pb2 as tpb

if TYPE_CHECKING:
    import torch


@dataclass
class Timer:
    copy_s: float = 0.0
    broadcast_s: float = 0.0
    reload_s: float = 0.0
    setup_s: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def pb(self, total: float) -> tpb.PhaseTimes:
        return tpb.PhaseTimes(
            copy_s=self.copy_s,
            broadcast_s=self.broadcast_s,
            reload_s=self.reload_s,
            setup_s=self.setup_s,
            total_s=total,
        )


def elapsed(pairs: list[tuple[torch.cuda.Event | None, torch.cuda.Event | None]]) -> float:
    total = 0.0
    for t0, t1 in pairs:
        if t0 is not None and t1 is not None:
            try:
                total += t0.elapsed_time(t1) / 1000.0
            except RuntimeError:
                pass
    return total
