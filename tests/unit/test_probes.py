"""Probes, pure parts: validation, the verdict on an engine's answer, the request it sends,
and the probe's round trip through the registry and the wire."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ckpt_client.probes import load_probe, make_probe
from ckpt_common.errors import InvalidArgument
from ckpt_daemon.api import convert
from ckpt_daemon.engines import probes
from ckpt_daemon.model import Probe
from ckpt_daemon.registry.store import Registry
from tests.unit.test_registry import make_cv

GREEDY = Probe(prompt=(1, 5, 6), expected=(7, 8, 9))
TF = Probe(prompt=(1, 5), expected=(7, 8), logprobs=(-1.0, -2.0), tolerance=0.01)


@pytest.mark.parametrize(
    "p, why",
    [
        (Probe(prompt=(), expected=(1,)), "prompt tokens"),
        (Probe(prompt=(1,) * 4097, expected=(1,)), "prompt tokens"),
        (Probe(prompt=(1,), expected=()), "expected tokens"),
        (Probe(prompt=(1,), expected=(1,) * 257), "expected tokens"),
        (Probe(prompt=(1, -1), expected=(1,)), "negative"),
        (Probe(prompt=(1,), expected=(1, 2), logprobs=(-1.0,)), "1 log-probs for 2"),
        (Probe(prompt=(1,), expected=(1,), logprobs=(float("inf"),)), "finite"),
        (Probe(prompt=(1,), expected=(1,), logprobs=(0.5,)), "at most 0"),
        (Probe(prompt=(1,), expected=(1,), logprobs=(-1.0,), tolerance=-1), "tolerance"),
        (Probe(prompt=(1,), expected=(1,), logprobs=(-1.0,), tolerance=float("nan")), "tolerance"),
        (Probe(prompt=(1,), expected=(1,), tolerance=0.1), "needs expected log-probs"),
    ],
)
def test_validate_refuses(p: Probe, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        probes.validate(p)


def test_validate_accepts() -> None:
    probes.validate(GREEDY)
    probes.validate(TF)


def test_greedy_request_and_verdict() -> None:
    body = probes.request_body(GREEDY)
    assert body["prompt"] == [1, 5, 6] and body["max_tokens"] == body["min_tokens"] == 3
    assert body["temperature"] == 0 and body["vllm_xargs"] == {probes.PROBE_ARG: 1}
    assert probes.judge(GREEDY, {"choices": [{"token_ids": [7, 8, 9]}]}) == ""
    assert "token 1 of 3 is 4, expected 8" in probes.judge(
        GREEDY, {"choices": [{"token_ids": [7, 4, 9]}]}
    )
    assert "2 tokens, expected 3" in probes.judge(GREEDY, {"choices": [{"token_ids": [7, 8]}]})
    assert "malformed" in probes.judge(GREEDY, {"choices": []})
    assert "malformed" in probes.judge(GREEDY, {"choices": [{"token_ids": ["x"]}]})


def _tf_answer(lp7: float, lp8: float) -> dict:
    return {
        "choices": [
            {
                "prompt_logprobs": [
                    None,
                    {"5": {"logprob": -3.0}},
                    {"7": {"logprob": lp7}, "2": {"logprob": -0.1}},
                    {"8": {"logprob": lp8}},
                ]
            }
        ]
    }


def test_teacher_forced_request_and_verdict() -> None:
    body = probes.request_body(TF)
    assert body["prompt"] == [1, 5, 7, 8] and body["max_tokens"] == 1
    assert body["prompt_logprobs"] == 0
    assert probes.judge(TF, _tf_answer(-1.005, -1.995)) == ""
    miss = probes.judge(TF, _tf_answer(-1.0, -2.5))
    assert "log-prob of token 1 (8) is -2.5, expected -2" in miss
    assert "malformed" in probes.judge(TF, {"choices": [{"prompt_logprobs": [None] * 4}]})
    nan = probes.judge(TF, _tf_answer(float("nan"), -2.0))
    assert "token 0" in nan  # NaN never passes


def test_wire_and_registry_round_trip(tmp_path) -> None:
    pb = make_probe([1, 2], [3], [-0.5], 0.25)
    p = convert.probe_from_pb(pb)
    assert p == Probe(prompt=(1, 2), expected=(3,), logprobs=(-0.5,), tolerance=0.25)
    assert convert.probe_to_pb(p) == pb
    assert convert.probe_from_pb(make_probe([], [])) is None
    reg = Registry(str(tmp_path))
    cv = make_cv()
    cv.probe = p
    reg.add_checkpoint(cv)
    other = dataclasses.replace(make_cv(), version=cv.version + 1)
    reg.add_checkpoint(other)
    reg2 = Registry(str(tmp_path))
    assert reg2.get_checkpoint(cv.name, cv.version).probe == p
    assert reg2.get_checkpoint(cv.name, cv.version + 1).probe is None
    reg2.remove_checkpoint(cv.name, cv.version)
    assert Registry(str(tmp_path)).get_checkpoint(cv.name, cv.version) is None


def test_probe_file(tmp_path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"prompt": [1], "expected": [2, 3]}))
    assert load_probe(str(f)) == make_probe([1], [2, 3])
    f.write_text(json.dumps({"prompt": [1], "expected": [2], "extra": 1}))
    with pytest.raises(InvalidArgument, match="want an object"):
        load_probe(str(f))
    with pytest.raises(InvalidArgument, match="probe file"):
        load_probe(str(tmp_path / "missing.json"))
