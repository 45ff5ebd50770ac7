"""The agent's tunables are read once, when it starts: a bad value stops the agent there,
naming the variable, instead of failing an update later."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckpt_agent.tunables import Tunables


def test_defaults_and_values_from_the_environment() -> None:
    t = Tunables.from_env({})
    assert (t.step_timeout_s, t.load_threads, t.p2p_timeout_s) == (5.0, 0, 10)
    assert 1 <= t.threads() <= 8
    t = Tunables.from_env(
        {"CKPT_STEP_TIMEOUT_S": "2.5", "CKPT_LOAD_THREADS": "3", "CKPT_P2P_TIMEOUT_S": "7"}
    )
    assert (t.step_timeout_s, t.threads(), t.p2p_timeout_s) == (2.5, 3, 7)


@pytest.mark.parametrize(
    ("name", "value"),
    [("CKPT_STEP_TIMEOUT_S", "abc"), ("CKPT_STEP_TIMEOUT_S", "0"), ("CKPT_LOAD_THREADS", "-1"),
     ("CKPT_LOAD_THREADS", "1.5"), ("CKPT_P2P_TIMEOUT_S", "0")],
)  # fmt: skip
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        Tunables.from_env({name: value})


def test_the_agent_refuses_to_start_on_a_bad_value() -> None:
    env = {**os.environ, "CKPT_STEP_TIMEOUT_S": "soon"}
    r = subprocess.run([sys.executable, "-m", "ckpt_agent.main", "--node-id", "t"], env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "CKPT_STEP_TIMEOUT_S='soon'" in r.stderr, r.stderr
