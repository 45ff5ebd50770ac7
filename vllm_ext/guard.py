"""An ASGI middleware for vLLM's OpenAI server: `--middleware vllm_ext.guard.CkptGuard`.

ckptd drives engines through vLLM's dev-mode endpoints (/pause, /collective_rpc, ...), which
otherwise let anyone who reaches the port call any worker method. With the guard:

- the serving API stays open (/v1/..., /health, /metrics, tokenize, ...), except that a
  request carrying ckptd's probe marker (`vllm_xargs.ckpt_probe`: it runs while the engine
  is paused) needs the engine token;
- every other route (pause, resume, collective_rpc, sleep, weight transfer, LoRA loading,
  profiling, ...) needs the engine token in `X-Ckpt-Token`; a route vLLM adds later is
  closed until listed here;
- /collective_rpc runs only ckptd's own worker methods (`ckpt_update`, `ckpt_info`,
  `ckpt_layout`).

The token is read from CKPT_ENGINE_TOKEN_FILE (the file ckptd's `--engine-token-file`
names, 0600). Without it, every guarded route answers 403. Refusals name the rule, never
echo the request.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

TOKEN_FILE_ENV = "CKPT_ENGINE_TOKEN_FILE"
TOKEN_HEADER = b"x-ckpt-token"
PROBE_MARK = b"ckpt_probe"  # vllm_ext.probe_scheduler.PROBE_ARG
ALLOWED_RPC = frozenset({"ckpt_update", "ckpt_info", "ckpt_layout"})
MAX_BODY = 64 << 20  # a guarded body is read whole before it goes on
PUBLIC_EXACT = frozenset(
    {
        "/health",
        "/ping",
        "/version",
        "/metrics",
        "/load",
        "/tokenize",
        "/detokenize",
        "/invocations",
        "/pooling",
        "/classify",
        "/score",
        "/rerank",
        "/is_paused",
        "/weight_info",  # the weight version: what a client may want to know it is served
    }
)
PRIVATE_V1 = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def is_public(path: str) -> bool:
    if path in PUBLIC_EXACT:
        return True
    return path.startswith(("/v1/", "/v2/")) and not path.startswith(PRIVATE_V1)


def load_token() -> bytes:
    path = os.environ.get(TOKEN_FILE_ENV, "")
    if not path:
        return b""
    with open(path, "rb") as f:
        return f.read().strip()


def is_probe(body: bytes) -> bool:
    """The request carries the probe marker in vllm_xargs (not merely the word in a prompt)."""
    try:
        xargs = json.loads(body).get("vllm_xargs")
    except (ValueError, AttributeError):
        return False
    return isinstance(xargs, dict) and "ckpt_probe" in xargs


def rpc_refusal(body: bytes) -> str:
    """Why a /collective_rpc body is refused; "" when it calls one of our methods."""
    try:
        method = json.loads(body).get("method")
    except (ValueError, AttributeError):
        return "collective_rpc: the body is not a JSON object"
    if method not in ALLOWED_RPC:
        return f"collective_rpc: only {sorted(ALLOWED_RPC)} may be called"
    return ""


class CkptGuard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.token = load_token()

    def _authorized(self, scope: Scope) -> bool:
        if not self.token:
            return False
        for key, value in scope.get("headers") or ():
            if key.lower() == TOKEN_HEADER:
                return hmac.compare_digest(value.strip(), self.token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        public = is_public(path)
        if public and scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        authorized = self._authorized(scope)
        if not public and not authorized:
            await _deny(send, 403, "this route needs ckptd's engine token (X-Ckpt-Token)")
            return
        body, more = await _read_body(receive)
        if more:
            await _deny(send, 413, "request body too large")
            return
        # (a marker spelled with JSON escapes has no plain bytes: those bodies are parsed too)
        maybe = PROBE_MARK in body or b"\\u" in body
        if public and not authorized and maybe and is_probe(body):
            await _deny(send, 403, "ckpt_probe requests need ckptd's engine token")
            return
        if path == "/collective_rpc":
            why = rpc_refusal(body)
            if why:
                await _deny(send, 403, why)
                return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole body (and whether it went past MAX_BODY)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg.get("type") != "http.request":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return b"", True
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, for handlers that watch for it

    return again


async def _deny(send: Send, status: int, why: str) -> None:
    body = json.dumps({"error": why}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
