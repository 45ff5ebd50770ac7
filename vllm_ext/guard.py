"""An ASGI middleware for vLLM's OpenAI server: `--middleware vllm_ext.guard.CkptGuard`.

ckptd drives engines through vLLM's dev-mode endpoints (/pause, /collective_rpc, ...), which
otherwise let anyone who reaches the port call any worker method. With the guard:

- the serving API stays open (/v1/..., /health, /metrics, tokenize, ...), except that a
  request carrying ckptd's probe marker (`vllm_xargs.ckpt_probe`: it runs while the engine
  is paused) must be ckptd's; a body that could carry it is read exactly as the server reads
  it, or refused (vllm_ext.guard_body);
- every other route (pause, resume, collective_rpc, sleep, weight transfer, LoRA loading,
  profiling, ...) needs ckptd's per-call signature (`X-Ckpt-Signature`, made with this
  instance's own key: ckpt_common.engine_auth, vllm_ext.guard_auth); a route vLLM adds later
  is closed until listed here;
- /collective_rpc runs only ckptd's own worker methods (`ckpt_update`, `ckpt_info`,
  `ckpt_layout`);
- `GET /ckpt_engine_proof?nonce=..` is answered here: the proof ckptd asks for before it
  signs anything for this endpoint.

The key is read from CKPT_ENGINE_TOKEN_FILE (this instance's key, `ckptd engine-key NAME`,
0600). Without it, every guarded route answers 403. Refusals name the rule, never echo the
request.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ckpt_common.engine_auth import PROOF_PATH, SIG_HEADER
from vllm_ext import guard_body
from vllm_ext.guard_auth import TOKEN_FILE_ENV, Verifier, configured_address, load_key
from vllm_ext.guard_body import ALLOWED_RPC, rpc_refusal

__all__ = ["ALLOWED_RPC", "TOKEN_FILE_ENV", "CkptGuard", "is_public", "rpc_refusal"]

SIG = SIG_HEADER.lower().encode()
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
SAFE = ("GET", "HEAD", "OPTIONS")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def is_public(path: str) -> bool:
    if path in PUBLIC_EXACT:
        return True
    return path.startswith(("/v1/", "/v2/")) and not path.startswith(PRIVATE_V1)


def _bodiless(headers: Any) -> bool:
    length = guard_body.header(headers, b"content-length").strip()
    chunked = guard_body.header(headers, b"transfer-encoding")
    return not chunked and length in (b"", b"0")


class CkptGuard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.verifier = Verifier(load_key(), configured_address())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope.get("type") == "websocket" and not is_public(path):
            await send({"type": "websocket.close", "code": 1008})  # closed like HTTP routes
            return
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or ()
        if path == PROOF_PATH:
            status, answer = self.verifier.proof(scope)
            await _answer(send, status, answer)
            return
        public = is_public(path)
        if public and scope.get("method") in SAFE and _bodiless(headers):
            await self.app(scope, receive, send)
            return
        sig = guard_body.header(headers, SIG).decode("latin-1")
        if not public and not sig:
            await _deny(send, 403, "this route needs ckptd's signature (X-Ckpt-Signature)")
            return
        why = guard_body.encoding_refusal(headers)
        if why:
            await _deny(send, *why)
            return
        body, more = await _read_body(receive)
        if more:
            await _deny(send, 413, "request body too large")
            return
        if sig:
            bad = self.verifier.check(scope, body, sig)
            if bad:
                await _deny(send, 403, f"ckptd's signature refused: {bad}")
                return
        else:  # a public route, unsigned: the probe marker is ckptd's alone
            why = guard_body.probe_refusal(headers, body)
            if why:
                await _deny(send, *why)
                return
        if path == "/collective_rpc":
            rpc = rpc_refusal(body)
            if rpc:
                await _deny(send, 403, rpc)
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
    await _answer(send, status, {"error": why})


async def _answer(send: Send, status: int, answer: dict) -> None:
    body = json.dumps(answer).encode()
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
