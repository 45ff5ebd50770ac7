"""Mapping the agent worker's hand-off buffer into this process, once per buffer.

The buffer is named by a string: "shm:<segment>" on CPU, "cuda:<encoded IPC handle>" on CUDA.
"""

from __future__ import annotations

from typing import Any


class MappedBuffer:
    def __init__(self) -> None:
        self._name = ""
        self._handle: Any = None
        self.tensor: Any = None

    def map(self, name: str, device: Any = None) -> Any:
        if name == self._name and self.tensor is not None:
            return self.tensor
        self.close()
        if name.startswith("shm:"):
            import torch

            from ckpt_agent import shm

            mem = shm.attach(name[4:])
            self._handle = mem
            self.tensor = torch.frombuffer(mem.buf, dtype=torch.uint8)
        elif name.startswith("cuda:"):
            from ckpt_agent.backends.cuda_ipc import open_handle

            self.tensor, self._handle = open_handle(name[5:], device)
        else:
            raise ValueError(f"unknown buffer kind in {name[:16]!r}")
        self._name = name
        return self.tensor

    def close(self) -> None:
        self.tensor = None
        h, self._handle, self._name = self._handle, None, ""
        if h is not None and hasattr(h, "close"):
            try:
                h.close()
            except BufferError:
                pass
