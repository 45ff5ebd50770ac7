"""The engine side of ckptd's engine credentials (ckpt_common.engine_auth): checks the
signature of each request, once, and answers ckptd's proof challenge.

The key is this instance's own (`ckptd engine-key NAME`), read from CKPT_ENGINE_TOKEN_FILE.
The engine's address is the one each connection reached (the socket's local address), or
CKPT_ENGINE_ADDRESS (host:port as ckptd reaches it) where a NAT or a proxy stands between.
"""

from __future__ import annotations

import hmac
import os
import time
import urllib.parse
from typing import Any

from ckpt_common import engine_auth as ea

TOKEN_FILE_ENV = "CKPT_ENGINE_TOKEN_FILE"
ADDRESS_ENV = "CKPT_ENGINE_ADDRESS"
MAX_NONCES = 100_000  # signatures remembered (each for 2 windows); more are refused


def load_key() -> bytes:
    path = os.environ.get(TOKEN_FILE_ENV, "")
    if not path:
        return b""
    with open(path, "rb") as f:
        return f.read().strip()


def configured_address() -> str:
    addr = os.environ.get(ADDRESS_ENV, "").strip()
    if not addr:
        return ""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ADDRESS_ENV} must be host:port, not {addr!r}")
    return ea.server_name(host, int(port))


class Verifier:
    def __init__(self, key: bytes, address: str = "") -> None:
        self.key = key
        self.address = address  # "": each connection's local address
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten

    def server(self, scope: dict[str, Any]) -> str:
        if self.address:
            return self.address
        srv = scope.get("server")
        if not srv or srv[1] is None:
            return ""
        return ea.server_name(str(srv[0]), int(srv[1]))

    def check(self, scope: dict[str, Any], body: bytes, header: str, now: float = 0.0) -> str:
        """Why the request's signature is refused; "" when it is ckptd's, fresh and new."""
        if not self.key:
            return "this engine has no key (CKPT_ENGINE_TOKEN_FILE)"
        parsed = ea.parse_signature(header)
        if parsed is None:
            return "malformed signature"
        ts, nonce, mac = parsed
        now = now or time.time()
        if abs(now - ts) > ea.WINDOW_S:
            return "signature expired (or clocks differ)"
        server = self.server(scope)
        query = (scope.get("query_string") or b"").decode("latin-1")
        want = ea.request_mac(
            self.key, server, scope.get("method", ""), scope.get("path", ""), query, body, ts, nonce
        )
        if not _equal(want, mac):
            return "bad signature"
        self._forget(now)
        if nonce in self._seen:
            return "signature replayed"
        if len(self._seen) >= MAX_NONCES:
            return "too many signed requests: try again"
        self._seen[nonce] = now + 2 * ea.WINDOW_S
        return ""

    def _forget(self, now: float) -> None:
        if self._seen and next(iter(self._seen.values())) < now:
            self._seen = {n: t for n, t in self._seen.items() if t >= now}

    def proof(self, scope: dict[str, Any]) -> tuple[int, dict[str, str]]:
        """(status, answer) to a proof challenge `?nonce=<hex>`."""
        if not self.key:
            return 403, {"error": "this engine has no key (CKPT_ENGINE_TOKEN_FILE)"}
        query = urllib.parse.parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        nonces = query.get("nonce", [])
        if len(nonces) != 1 or not ea.NONCE_RE.fullmatch(nonces[0]):
            return 400, {"error": "a proof needs one nonce of 32-128 lowercase hex digits"}
        server = self.server(scope)
        if not server:
            return 400, {"error": "this engine does not know its address"}
        return 200, {"server": server, "proof": ea.proof_mac(self.key, server, nonces[0])}


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
