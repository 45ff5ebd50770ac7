"""Probes: the engine's own proof that it serves a checkpoint version.

A trainer gives a probe at push: prompt token ids and the expected greedy continuation, or
the expected log-prob of each continuation token (teacher-forced) with a tolerance. After an
engine loaded a whole version and before it resumes serving, ckptd runs the probe on it (a
vLLM engine runs it while every other request is held: vllm_ext.ProbeScheduler); a miss fails
the update for that instance, which is then restored to its previous version.

`validate` and `judge` are pure; `run` is the HTTP call.
"""

from __future__ import annotations

import asyncio
import math
import urllib.error
from typing import Any

from ckpt_common.errors import InvalidArgument
from ckpt_daemon.engines.http import Signer, http_json
from ckpt_daemon.model import Probe

MAX_PROMPT = 4096
MAX_EXPECTED = 256
PROBE_ARG = "ckpt_probe"  # vllm_ext.probe_scheduler.PROBE_ARG


def validate(p: Probe) -> None:
    """Refuses a probe no engine could answer (before anything is pushed)."""
    if not 1 <= len(p.prompt) <= MAX_PROMPT:
        raise InvalidArgument(f"probe: 1-{MAX_PROMPT} prompt tokens, got {len(p.prompt)}")
    if not 1 <= len(p.expected) <= MAX_EXPECTED:
        raise InvalidArgument(f"probe: 1-{MAX_EXPECTED} expected tokens, got {len(p.expected)}")
    if min(p.prompt) < 0 or min(p.expected) < 0:
        raise InvalidArgument("probe: token ids must not be negative")
    if p.logprobs and len(p.logprobs) != len(p.expected):
        raise InvalidArgument(
            f"probe: {len(p.logprobs)} log-probs for {len(p.expected)} expected tokens"
        )
    if any(not math.isfinite(x) or x > 0 for x in p.logprobs):
        raise InvalidArgument("probe: log-probs must be finite and at most 0")
    if not (math.isfinite(p.tolerance) and p.tolerance >= 0):
        raise InvalidArgument("probe: tolerance must be a finite number >= 0")
    if p.tolerance and not p.logprobs:
        raise InvalidArgument("probe: a tolerance needs expected log-probs")


def request_body(p: Probe) -> dict[str, Any]:
    """The completion that answers the probe. With log-probs the expected tokens are part of
    the prompt (teacher-forced: one prefill, no sampling ties); without, a greedy decode."""
    body: dict[str, Any] = {"temperature": 0, "return_token_ids": True}
    body["vllm_xargs"] = {PROBE_ARG: 1}
    if p.logprobs:
        return {**body, "prompt": [*p.prompt, *p.expected], "max_tokens": 1, "prompt_logprobs": 0}
    n = len(p.expected)
    return {**body, "prompt": list(p.prompt), "max_tokens": n, "min_tokens": n}


def judge(p: Probe, answer: dict) -> str:
    """Why the engine's answer misses the probe; "" when it passes."""
    try:
        choice = answer["choices"][0]
        if not p.logprobs:
            got = [int(t) for t in choice["token_ids"]]
            for i, (g, e) in enumerate(zip(got, p.expected, strict=False)):
                if g != e:
                    return f"probe: token {i} of {len(p.expected)} is {g}, expected {e}"
            if len(got) != len(p.expected):
                return f"probe: {len(got)} tokens, expected {len(p.expected)}"
            return ""
        per_pos = choice["prompt_logprobs"][len(p.prompt) :]
        if len(per_pos) != len(p.expected):
            return f"probe: {len(per_pos)} log-probs, expected {len(p.expected)}"
        for i, (pos, tok, want) in enumerate(zip(per_pos, p.expected, p.logprobs, strict=True)):
            got = float((pos or {})[str(tok)]["logprob"])
            if not abs(got - want) <= p.tolerance:
                return (
                    f"probe: log-prob of token {i} ({tok}) is {got:.6g}, expected {want:.6g}"
                    f" ± {p.tolerance:g}"
                )
        return ""
    except (KeyError, IndexError, TypeError, ValueError) as e:
        return f"probe: malformed answer from the engine ({type(e).__name__}: {e})"


async def run(endpoint: str, p: Probe, timeout: float, signer: Signer | None = None) -> str:
    """Runs the probe on a paused vLLM engine, signed by `signer` (vllm_ext.guard lets only
    ckptd's probes in); returns why it missed ("" when it passed). Transport failures raise
    (the caller maps them)."""
    url = f"{endpoint.rstrip('/')}/v1/completions"
    try:
        answer = await asyncio.to_thread(
            http_json, url, request_body(p), timeout, "POST", None, signer
        )
    except TimeoutError:
        return (
            f"probe: no answer in {timeout:g} s (is the engine started with "
            "--scheduler-cls vllm_ext.ProbeScheduler?)"
        )
    except urllib.error.HTTPError as e:  # the body is the engine's: never echoed
        return f"probe: HTTP {e.code} from the engine"
    except ValueError:
        return "probe: the engine's answer is not JSON"
    return judge(p, answer)
