"""What vllm_ext.guard reads in a request body (pure). A body the guard inspects is read
exactly as the server will, or refused:

- JSON is decoded by `json.loads` of the bytes, as Starlette's `Request.json()` does, and
  only from UTF-8 (with or without a BOM): UTF-16/32 bodies are refused (415), since their
  bytes could spell the probe marker the guard looks for;
- a body the guard cannot read (not JSON, nested deeper than MAX_DEPTH, RecursionError) is
  refused (400) when it could carry the marker, never passed on, never a 500;
- form bodies (multipart, url-encoded: vLLM's audio routes read vllm_xargs from a form
  field) may not name vllm_xargs unsigned;
- compressed bodies (Content-Encoding other than identity) are refused (415).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

PROBE_MARK = b"ckpt_probe"  # vllm_ext.probe_scheduler.PROBE_ARG
XARGS = "vllm_xargs"
ALLOWED_RPC = frozenset({"ckpt_update", "ckpt_info", "ckpt_layout"})
MAX_DEPTH = 64
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
UTF8 = ("utf-8", "utf-8-sig")

Refusal = tuple[int, str]  # (HTTP status, why); why never echoes the request


def header(headers: Any, name: bytes) -> bytes:
    """A request header's value (b"" when absent); names compare case-insensitively."""
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return b""


def encoding_refusal(headers: Any) -> Refusal | None:
    enc = header(headers, b"content-encoding").strip().lower()
    if enc and enc != b"identity":
        return 415, "compressed request bodies are not accepted"
    return None


def load_json(body: bytes) -> tuple[Any, Refusal | None]:
    """The body as the server's json.loads reads it, or why the guard cannot read it."""
    if json.detect_encoding(body) not in UTF8:
        return None, (415, "request bodies must be UTF-8 JSON")
    try:
        obj = json.loads(body)
    except RecursionError:
        return None, (400, "the body is nested too deep")
    except ValueError:
        return None, (400, "the body is not JSON")
    if depth(obj) > MAX_DEPTH:
        return None, (400, f"the body is nested deeper than {MAX_DEPTH}")
    return obj, None


def depth(obj: Any) -> int:
    """How deep lists and objects nest (iterative)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = list(o.values())
        if isinstance(o, list):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                stack.extend((v, d + 1) for v in o if isinstance(v, dict | list))
    return deepest


def probe_refusal(headers: Any, body: bytes) -> Refusal | None:
    """Why an unsigned body to a serving route is refused: it carries ckptd's probe marker
    (`vllm_xargs.ckpt_probe`), or could and cannot be read."""
    ctype = header(headers, b"content-type").split(b";")[0].strip().lower().decode("latin-1")
    if ctype in FORMS:
        return _form_refusal(ctype, body)
    if json.detect_encoding(body) not in UTF8:
        return 415, "request bodies must be UTF-8 JSON"
    # In UTF-8 JSON the marker is spelled in plain bytes or with \u escapes.
    if PROBE_MARK not in body and b"\\u" not in body:
        return None
    obj, why = load_json(body)
    if why:
        return why
    xargs = obj.get(XARGS) if isinstance(obj, dict) else None
    if isinstance(xargs, dict) and PROBE_MARK.decode() in xargs:
        return 403, "ckpt_probe requests need ckptd's signature"
    return None


def _form_refusal(ctype: str, body: bytes) -> Refusal | None:
    text = body.lower()
    if ctype == FORMS[1]:
        text = urllib.parse.unquote_to_bytes(text.replace(b"+", b" ")).lower()
    # RFC 2231 names (name*=) could spell the field name in escapes
    if b"xargs" in text or b"name*" in text:
        return 403, "unsigned form bodies may not carry vllm_xargs"
    return None


def rpc_refusal(body: bytes) -> str:
    """Why a /collective_rpc body is refused; "" when it calls one of our methods."""
    obj, why = load_json(body)
    if why or not isinstance(obj, dict):
        return "collective_rpc: the body is not a JSON object"
    if obj.get("method") not in ALLOWED_RPC:
        return f"collective_rpc: only {sorted(ALLOWED_RPC)} may be called"
    return ""
