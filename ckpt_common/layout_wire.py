"""An engine rank's sharding map (vllm_ext.layout: {name: "whole" | [offset, shape] |
"none"}) as the ipc/agent protocols carry it (ckpt.v1.EngineLayout), and back: the map
stays a plain dict at both ends (the engine makes it, ckptd stores it), a message between."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt.v1 import ipc_pb2 as ipb

_WORDS = {"whole": ipb.KeptTensor.KEPT_WHOLE, "none": ipb.KeptTensor.KEPT_NONE}


def to_pb(layout: Mapping[str, Any]) -> ipb.EngineLayout:
    out = ipb.EngineLayout()
    for name, keep in layout.items():
        if isinstance(keep, str):
            if keep not in _WORDS:
                raise ValueError(f"{name}: unknown keep {keep!r}")
            out.tensors.add(name=name, kind=_WORDS[keep])
        else:
            offset, shape = keep
            out.tensors.add(name=name, kind=ipb.KeptTensor.KEPT_BOX, offset=offset, shape=shape)
    return out


def from_pb(layout: ipb.EngineLayout) -> dict[str, Any]:
    """The map; ValueError on an entry of unknown kind."""
    out: dict[str, Any] = {}
    for t in layout.tensors:
        if t.kind == ipb.KeptTensor.KEPT_BOX:
            out[t.name] = [list(t.offset), list(t.shape)]
        elif t.kind == ipb.KeptTensor.KEPT_WHOLE:
            out[t.name] = "whole"
        elif t.kind == ipb.KeptTensor.KEPT_NONE:
            out[t.name] = "none"
        else:
            raise ValueError(f"{t.name}: keep of unknown kind {t.kind}")
    return out
