"""Fault injection for the processes a test starts, kept out of the product: the test
cluster puts this folder on PYTHONPATH, so every child Python (ckptd, agents, their
workers, reference receivers, vLLM and its workers) imports it at start. With CKPT_FAULT
unset it does nothing. Set, it patches the named module once it is imported:

- "exit:<checkpoint>:<k>": an engine process dies (exit 17) when bucket k (or later) of
  that checkpoint arrives: an engine dying mid-update.
- "fail:<checkpoint>:<k>": the engine fails to load bucket k (after loading the ones
  before): a half-updated engine.
- "p2p_delay:<seconds>": every P2P read of a bucket is slowed, so a test can kill or freeze
  an owner while a join is surely under way.
- "patch_delay:<seconds>": an agent worker making a version from its delta (Patch) waits
  first, so a test can restart ckptd while a delta push's version is surely being made.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

SPEC = os.environ.get("CKPT_FAULT", "")


def _receiver(module: ModuleType) -> None:
    kind, _, rest = SPEC.partition(":")
    name, _, k = rest.partition(":")
    raw = inspect.getattr_static(module.Receiver, "_bucket_tensors")
    static = isinstance(raw, staticmethod)
    original = raw.__func__ if static else raw

    def bucket_tensors(*args: Any, **kwargs: Any) -> Any:
        info, bk = args[0 if static else 1 : 2 if static else 3]
        if info.checkpoint == name and bk.bucket >= int(k):
            if kind == "exit":
                os._exit(17)
            raise module.ReceiveError(f"injected failure at bucket {bk.bucket}")
        return original(*args, **kwargs)

    module.Receiver._bucket_tensors = staticmethod(bucket_tensors) if static else bucket_tensors


def _p2p(module: ModuleType) -> None:
    delay = float(SPEC.split(":", 1)[1])
    original = module.P2PReadBackend.flush

    def flush(self: Any) -> str:
        if self._queue:
            time.sleep(delay)
        return original(self)

    module.P2PReadBackend.flush = flush


def _patch_delay(module: ModuleType) -> None:
    delay = float(SPEC.split(":", 1)[1])
    original = module.patch

    def patch(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return original(*args, **kwargs)

    module.patch = patch


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a module the usual way, then patches it right after it has run."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self._patches = patches

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = self._patches.get(name)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_KINDS = {"exit": ("vllm_ext.receiver", _receiver), "fail": ("vllm_ext.receiver", _receiver),
          "p2p_delay": ("ckpt_agent.backends.p2p", _p2p),
          "patch_delay": ("ckpt_agent.delta_stores", _patch_delay)}  # fmt: skip
if SPEC.partition(":")[0] in _KINDS:
    _module, _patch = _KINDS[SPEC.partition(":")[0]]
    sys.meta_path.insert(0, _PatchOnImport({_module: _patch}))
