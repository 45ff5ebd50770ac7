"""Fault injection lives in tests (tests/support/faults/sitecustomize.py): with CKPT_FAULT
set, a child Python started with that folder on PYTHONPATH has the named product function
patched once its module is imported; without it, nothing is patched; the product itself
reads no CKPT_FAULT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cluster import FAULTS_DIR

REPO = Path(__file__).resolve().parents[2]
# fault -> (the patched function called as the product calls it, what it then prints)
CALLS = {
    "p2p_delay:0.25": (
        "import time, types, ckpt_agent.backends.p2p as m\n"
        "t = time.monotonic(); m.P2PReadBackend.flush(types.SimpleNamespace(_queue={}))\n"
        "print('idle', round(time.monotonic() - t, 2))\n"
        "t = time.monotonic(); e = types.SimpleNamespace(read=lambda *a: None)\n"
        "b = types.SimpleNamespace(_queue={0: (1, 2, 3)}, _engine=e, "
        "_sources=[types.SimpleNamespace(session='s')])\n"
        "print('flushed', repr(m.P2PReadBackend.flush(b)), time.monotonic() - t >= 0.25)",
        "idle 0.0\nflushed '' True",
    ),
    "fail:m:2": (
        "import types, vllm_ext.receiver as m; n = types.SimpleNamespace\n"
        "try:\n m.Receiver._bucket_tensors(n(checkpoint='m'), n(bucket=2), None, 0, {})\n"
        "except m.ReceiveError as e:\n print(e)",
        "injected failure at bucket 2",
    ),
    "patch_delay:0.25": (
        "import time, ckpt_agent.delta_stores as m\n"
        "t = time.monotonic()\n"
        "try:\n m.patch(None, None)\nexcept AttributeError:\n pass\n"
        "print('waited', time.monotonic() - t >= 0.25)",
        "waited True",
    ),
}
NAMES = {
    "p2p_delay:0.25": "import ckpt_agent.backends.p2p as m; print(m.P2PReadBackend.flush)",
    "fail:m:2": "import vllm_ext.receiver as m; print(m.Receiver._bucket_tensors)",
    "patch_delay:0.25": "import ckpt_agent.delta_stores as m; print(m.patch)",
}


def _child(code: str, fault: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(FAULTS_DIR)}
    env.pop("CKPT_FAULT", None)
    if fault is not None:
        env["CKPT_FAULT"] = fault
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("fault", sorted(CALLS))
def test_a_fault_patches_its_module_only_when_asked(fault: str) -> None:
    code, expected = CALLS[fault]
    assert _child(code, fault) == expected  # fires as the product calls it
    assert "<locals>" in _child(NAMES[fault], fault)  # the test's wrapper
    assert "<locals>" not in _child(NAMES[fault], None)  # without CKPT_FAULT: the product's


def test_the_product_reads_no_fault_variable() -> None:
    for pkg in ("ckpt_agent", "ckpt_daemon", "ckpt_common", "ckpt_client", "vllm_ext"):
        for p in (REPO / pkg).rglob("*.py"):
            assert "CKPT_FAULT" not in p.read_text(), p
