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
PROBE = {
    "p2p_delay:0.25": "import ckpt_agent.backends.p2p as m; "
    "print(m.P2PReadBackend.flush.__qualname__)",
    "fail:m:2": "import vllm_ext.receiver as m; print(m.Receiver._bucket_tensors.__qualname__)",
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


@pytest.mark.parametrize("fault", sorted(PROBE))
def test_a_fault_patches_its_module_only_when_asked(fault: str) -> None:
    code = PROBE[fault]
    assert "<locals>" in _child(code, fault)  # the test's wrapper
    assert "<locals>" not in _child(code, None)  # the product's own


def test_the_product_reads_no_fault_variable() -> None:
    for pkg in ("ckpt_agent", "ckpt_daemon", "ckpt_common", "ckpt_client", "vllm_ext"):
        for p in (REPO / pkg).rglob("*.py"):
            assert "CKPT_FAULT" not in p.read_text(), p
