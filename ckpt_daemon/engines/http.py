"""ckptd's HTTP calls to engines: JSON in, JSON out, bounded, with deadlines."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

# (method, url, body) -> headers that sign the request (ckpt_daemon.engines.proof)
Signer = Callable[[str, str, bytes], dict[str, str]]
MAX_ANSWER = 16 << 20  # an engine's JSON answer; more is refused, never echoed


def http_json(
    url: str,
    body: dict | None,
    timeout: float,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    signer: Signer | None = None,
) -> Any:
    data = None if body is None else json.dumps(body).encode()
    signed = signer(method, url, data or b"") if signer is not None else {}
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {}), **signed},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read(MAX_ANSWER + 1)
    if len(raw) > MAX_ANSWER:
        raise ValueError(f"the engine's answer is over {MAX_ANSWER} bytes")
    return json.loads(raw) if raw else None


def bounded(text: object, limit: int = 300) -> str:
    """An engine-supplied string as it may appear in a job's reason: printable, bounded."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= limit else s[:limit] + "..."
