"""Device backends behind one interface (base.py), chosen by kind (registry.py): cpu.py
(shared memory + gloo.py), cuda.py (pinned memory, nccl.py, cuda_ipc.py, cuda_memcpy.py),
p2p.py (reads of other ranks' stores, wrapping either). Imports nothing heavy."""

from ckpt_agent.backends.base import Backend, Collective, Copy, InFlight
from ckpt_agent.backends.registry import BACKENDS, make_backend

__all__ = ["BACKENDS", "Backend", "Collective", "Copy", "InFlight", "make_backend"]
