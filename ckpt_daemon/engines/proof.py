"""Before ckptd signs anything for an engine endpoint, the engine behind it proves it holds
its instance's key (ckpt_common.engine_auth): it answers a fresh nonce with an HMAC bound
to its own address, which must be the address ckptd's own connection reached (no relay
through another port or host). The signer then binds every request to that address."""

from __future__ import annotations

import hmac
import http.client
import json
import urllib.parse
from dataclasses import dataclass

from ckpt_common import engine_auth as ea

MAX_PROOF = 4096  # bytes of an answer to a proof


class EngineUnproven(Exception):
    """The endpoint did not prove it is the instance's engine (the message says why)."""


@dataclass(frozen=True)
class EngineSigner:
    """Signs each request to one proven engine (X-Ckpt-Signature)."""

    key: bytes
    server: str

    def __call__(self, method: str, url: str, body: bytes) -> dict[str, str]:
        u = urllib.parse.urlsplit(url)
        sig = ea.sign(self.key, self.server, method, u.path or "/", u.query, body)
        return {ea.SIG_HEADER: sig}


def prove(endpoint: str, key: bytes, timeout: float) -> EngineSigner:
    """A signer for `endpoint` once its engine proved it holds `key`. Raises EngineUnproven,
    or OSError / TimeoutError when the endpoint cannot be reached."""
    u = urllib.parse.urlsplit(endpoint)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname or "", u.port, timeout=timeout)
    nonce = ea.new_nonce()
    try:
        conn.request("GET", f"{ea.PROOF_PATH}?nonce={nonce}")
        peer = conn.sock.getpeername() if conn.sock else ("", 0)
        resp = conn.getresponse()
        raw = resp.read(MAX_PROOF + 1)
    finally:
        conn.close()
    if resp.status != 200:
        raise EngineUnproven(
            f"HTTP {resp.status} to the proof (an engine behind vllm_ext.guard, with its "
            "instance's key in CKPT_ENGINE_TOKEN_FILE, answers it)"
        )
    try:
        answer = json.loads(raw[:MAX_PROOF])
        server, proof = str(answer["server"]), str(answer["proof"])
    except (ValueError, KeyError, TypeError):
        raise EngineUnproven("the answer to the proof is malformed") from None
    if not hmac.compare_digest(proof.encode(), ea.proof_mac(key, server, nonce).encode()):
        raise EngineUnproven("the proof does not match the instance's key")
    reached = ea.server_name(str(peer[0]), int(peer[1]))
    if server != reached:
        raise EngineUnproven(
            f"the proof is for {server[:80]!r}, this connection reached {reached} "
            "(set CKPT_ENGINE_ADDRESS on the engine behind a NAT or proxy)"
        )
    return EngineSigner(key, server)
