"""Engine credentials (pure): per-instance keys, per-call request signatures, proofs.

ckptd holds a master secret (`--engine-token-file`). Each vLLM instance gets its own key,
`instance_key(master, name)` (HMAC-SHA256 of the instance's name), which its engine's guard
(vllm_ext.guard) reads from CKPT_ENGINE_TOKEN_FILE. No key ever travels:

- a request ckptd sends an engine carries `X-Ckpt-Signature: v1 ts=.. nonce=.. sig=..`, an
  HMAC over the engine's own address (as it proved it), method, path, query, sha256 of the
  body, a timestamp and a random nonce; the guard accepts it once, within WINDOW_S;
- before ckptd signs anything for an endpoint, the engine behind it proves it holds the
  instance's key: it answers a fresh nonce on PROOF_PATH with HMAC(key, its own address,
  nonce); ckptd checks the address is the one its own connection reached.

Whatever an endpoint captures is bound to one request of one engine and expires: it opens
nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

SIG_HEADER = "X-Ckpt-Signature"
PROOF_PATH = "/ckpt_engine_proof"  # GET ?nonce=<hex>; answered by the guard itself
WINDOW_S = 60.0  # a signature's timestamp may be this far from the engine's clock
NONCE_RE = re.compile(r"[0-9a-f]{32,128}")
_SIG_RE = re.compile(r"v1 ts=(\d{1,12}) nonce=([0-9a-f]{32,128}) sig=([0-9a-f]{64})")
_KEY_CONTEXT = b"ckpt-engine:"
_REQ_CONTEXT = "ckpt-req-v1"
_PROOF_CONTEXT = "ckpt-proof-v1"


def instance_key(master: bytes, instance: str) -> bytes:
    """The key of one instance (hex, as its engine's key file holds it)."""
    return hmac.new(master, _KEY_CONTEXT + instance.encode(), hashlib.sha256).hexdigest().encode()


def server_name(host: str, port: int) -> str:
    """An address as both sides write it: "1.2.3.4:80", "[::1]:80" (v4-mapped v6 as v4)."""
    host = host.strip("[]").lower()
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_mac(
    key: bytes, server: str, method: str, path: str, query: str, body: bytes, ts: int, nonce: str
) -> str:
    fields = [_REQ_CONTEXT, server, method.upper(), path, query]
    fields += [hashlib.sha256(body).hexdigest(), str(ts), nonce]
    return hmac.new(key, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def sign(
    key: bytes,
    server: str,
    method: str,
    path: str,
    query: str,
    body: bytes,
    now: float | None = None,
) -> str:
    """The X-Ckpt-Signature value of one request."""
    ts = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    mac = request_mac(key, server, method, path, query, body, ts, nonce)
    return f"v1 ts={ts} nonce={nonce} sig={mac}"


def parse_signature(value: str) -> tuple[int, str, str] | None:
    """(ts, nonce, mac) of a well-formed header value; None otherwise."""
    m = _SIG_RE.fullmatch(value.strip())
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def proof_mac(key: bytes, server: str, nonce: str) -> str:
    msg = f"{_PROOF_CONTEXT}\n{server}\n{nonce}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def new_nonce() -> str:
    return secrets.token_hex(32)
