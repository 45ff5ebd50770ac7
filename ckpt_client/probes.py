"""Probes for a push: what the engines must answer before they serve the pushed version.

    probe = greedy_probe(model, prompt_ids, 16)              # on the trainer, same weights
    client.push_tensors("run", 7, model.state_dict(), probe=probe)

A JSON file for `ckptctl push --probe FILE`: {"prompt": [...], "expected": [...]} (greedy
tokens, exact), optionally with "logprobs": [...] and "tolerance": 0.05 (teacher-forced
log-prob of each expected token, within tolerance: robust to kernels that differ in the last
bits, which can flip a greedy near-tie).
"""

from __future__ import annotations

import json
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument


def make_probe(
    prompt: list[int],
    expected: list[int],
    logprobs: list[float] | None = None,
    tolerance: float = 0.0,
) -> tpb.Probe:
    return tpb.Probe(
        prompt_token_ids=list(prompt),
        expected_token_ids=list(expected),
        expected_logprobs=list(logprobs or []),
        logprob_tolerance=tolerance,
    )


def load_probe(path: str) -> tpb.Probe:
    """A probe from a JSON file; InvalidArgument when it is not one."""
    try:
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict) or set(d) - {"prompt", "expected", "logprobs", "tolerance"}:
            raise ValueError("want an object with prompt, expected, logprobs, tolerance")
        return make_probe(d["prompt"], d["expected"], d.get("logprobs"), d.get("tolerance", 0.0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgument(f"probe file {path}: {e}") from None


def greedy_probe(
    model: Any, prompt: list[int], n: int, *, tolerance: float | None = None
) -> tpb.Probe:
    """The greedy continuation of `prompt` by a causal LM (transformers: model(ids).logits),
    token by token without a cache. With a tolerance, the probe checks each token's log-prob
    (teacher-forced) instead of exact tokens."""
    import torch

    ids = list(prompt)
    lps: list[float] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            ids.append(tok)
    expected = ids[len(prompt) :]
    if tolerance is None:
        return make_probe(prompt, expected)
    return make_probe(prompt, expected, lps, tolerance)
