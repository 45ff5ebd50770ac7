"""The agent's backends behind one interface: chosen by kind from the registry, importable
without torch (the CUDA module included), and a worker's start arguments checked once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckpt_agent.backends import BACKENDS, Backend, make_backend
from ckpt_agent.config import WorkerSpec


def test_the_registry_makes_a_cpu_backend_and_refuses_unknown_kinds() -> None:
    be = make_backend("cpu", node_id="n", device=0, host="127.0.0.1")
    try:
        assert isinstance(be, Backend) and be.kind == "cpu" and not be.pins_stores
        assert set(BACKENDS) == {"cpu", "cuda"}
    finally:
        be.close()
    with pytest.raises(ValueError, match="no backend of kind"):
        make_backend("tpu", node_id="n", device=0, host="127.0.0.1")


def test_backends_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import ckpt_agent.backends, ckpt_agent.backends.cuda, ckpt_agent.backends.p2p\n"
        "import ckpt_agent.worker, ckpt_agent.supervisor\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _spec(**kw: object) -> WorkerSpec:
    args: dict = dict(
        node_id="n", device=0, kind="cpu", ipc_dir="/tmp/x", host="127.0.0.1", log_level="info"
    )
    return WorkerSpec(**{**args, **kw})


def test_worker_spec_is_checked_when_made() -> None:
    assert _spec().stores.spares_for("cpu") == 0
    for bad in (
        {"node_id": ""},
        {"node_id": "a/b"},
        {"device": -1},
        {"kind": "tpu"},
        {"ipc_dir": ""},
        {"source_roots": ("relative",)},
    ):
        with pytest.raises(ValueError):
            _spec(**bad)
    with pytest.raises(TypeError):
        WorkerSpec("n", 0, "cpu", "/tmp/x", "127.0.0.1", "info")  # type: ignore[misc]
