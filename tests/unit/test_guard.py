"""vllm_ext.guard as ASGI (a minimal app behind it), and the engine-side endpoint checks.
The same guard in front of real vLLM engines: tests/vllm/test_vllm_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from ckpt_common import engine_auth as ea
from ckpt_common.ipc import endpoint_refusal, worker_endpoint
from ckpt_daemon.engines.endpoints import endpoint_refusal as engine_refusal
from vllm_ext import guard
from vllm_ext.guard_auth import Verifier

KEY = ea.instance_key(b"m" * 32, "A")
SERVER = "127.0.0.1:8000"


def call(
    path: str,
    body: bytes = b"",
    method: str = "POST",
    key: bytes | None = None,
    *,
    query: str = "",
    headers: list | None = None,
    sig: str = "",
    verifier: Verifier | None = None,
):
    """(status, answer, the body the app saw) of one request through the guard; key: signed
    with it, for SERVER (the address the engine's socket is on)."""
    seen: dict = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    g = guard.CkptGuard(app)
    g.verifier = verifier or Verifier(KEY)
    hdrs = [(b"content-type", b"application/json")] if headers is None else list(headers)
    if key is not None:
        sig = ea.sign(key, SERVER, method, path, query, body)
    if sig:
        hdrs.append((b"X-Ckpt-Signature", sig.encode()))
    if body:
        hdrs.append((b"content-length", b"%d" % len(body)))
    scope = {
        "type": "http",
        "path": path,
        "method": method,
        "headers": hdrs,
        "query_string": query.encode(),
        "server": ("127.0.0.1", 8000),
    }
    chunks = [body[:3], body[3:]]
    out: list[dict] = []

    async def receive():
        c = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": c, "more_body": bool(chunks)}

    async def send(m):
        out.append(m)

    asyncio.run(g(scope, receive, send))
    status = out[0]["status"]
    text = b"".join(m.get("body", b"") for m in out[1:])
    return status, text, seen.get("body")


@pytest.mark.parametrize(
    "path",
    [
        "/pause",
        "/resume",
        "/collective_rpc",
        "/sleep",
        "/update_weights",
        "/start_profile",
        "/v1/load_lora_adapter",
        "/init_weight_transfer_engine",
        "/some_new_route",
        "/docs",
    ],
)
def test_admin_routes_need_a_signature(path: str) -> None:
    status, text, _ = call(path, b"{}")
    assert status == 403 and b"signature" in text
    other = ea.instance_key(b"m" * 32, "B")  # another instance's key opens nothing here
    assert call(path, b"{}", key=other)[0] == 403
    assert call(path, b"{}", sig="v1 ts=1 nonce=00 sig=00")[0] == 403


def test_signatures_are_per_call() -> None:
    """A signature opens one request (method, path, query, body) of one engine, once, while
    fresh: whatever an endpoint captured opens nothing else."""
    v = Verifier(KEY)
    body = json.dumps({"method": "ckpt_info"}).encode()
    sig = ea.sign(KEY, SERVER, "POST", "/collective_rpc", "", body)
    assert call("/collective_rpc", body, sig=sig, verifier=v)[0] == 200
    status, text, _ = call("/collective_rpc", body, sig=sig, verifier=v)
    assert status == 403 and b"replayed" in text
    for method, path, query, b in (
        ("POST", "/pause", "", body),
        ("POST", "/collective_rpc", "x=1", body),
        ("POST", "/collective_rpc", "", b'{"method": "ckpt_update"}'),
        ("PUT", "/collective_rpc", "", body),
    ):
        sig = ea.sign(KEY, SERVER, "POST", "/collective_rpc", "", body)
        status, text, _ = call(path, b, method, query=query, sig=sig, verifier=v)
        assert status == 403 and b"bad signature" in text, (method, path, query)
    elsewhere = ea.sign(KEY, "127.0.0.1:9000", "POST", "/pause", "", b"")  # another engine
    assert call("/pause", sig=elsewhere, verifier=v)[0] == 403
    old = ea.sign(KEY, SERVER, "POST", "/pause", "", b"", now=time.time() - 2 * ea.WINDOW_S)
    status, text, _ = call("/pause", sig=old, verifier=v)
    assert status == 403 and b"expired" in text
    assert call("/pause", key=KEY, verifier=v)[0] == 200
    assert call("/pause", key=KEY, verifier=Verifier(b""))[0] == 403  # no key: all closed


def test_proof_answers_only_with_the_key_and_for_its_own_address() -> None:
    nonce = ea.new_nonce()
    status, text, seen = call(ea.PROOF_PATH, method="GET", query=f"nonce={nonce}")
    answer = json.loads(text)
    assert status == 200 and seen is None  # answered by the guard, not the app
    assert answer["server"] == SERVER
    assert answer["proof"] == ea.proof_mac(KEY, SERVER, nonce)
    assert answer["proof"] != ea.proof_mac(ea.instance_key(b"m" * 32, "B"), SERVER, nonce)
    pinned = Verifier(KEY, "10.0.0.5:30080")  # CKPT_ENGINE_ADDRESS behind a NAT
    ans = json.loads(call(ea.PROOF_PATH, method="GET", query=f"nonce={nonce}", verifier=pinned)[1])
    assert ans["server"] == "10.0.0.5:30080"
    for q in ("", "nonce=xyz", f"nonce={nonce}&nonce={nonce}", "nonce=AB" * 20):
        assert call(ea.PROOF_PATH, method="GET", query=q)[0] == 400
    status, _, _ = call(ea.PROOF_PATH, method="GET", query=f"nonce={nonce}", verifier=Verifier(b""))
    assert status == 403


def test_serving_routes_stay_open_but_probes_need_a_signature() -> None:
    body = json.dumps({"prompt": [1, 2], "max_tokens": 2}).encode()
    status, _, seen = call("/v1/completions", body)
    assert status == 200 and seen == body  # the body reaches the app whole
    assert call("/health", method="GET")[0] == 200
    assert call("/v1/models", method="GET")[0] == 200
    probe = json.dumps({"prompt": [1], "vllm_xargs": {"ckpt_probe": 1}}).encode()
    status, text, _ = call("/v1/completions", probe)
    assert status == 403 and b"ckpt_probe" in text
    assert call("/v1/completions", probe, key=KEY)[0] == 200
    words = json.dumps({"prompt": "what is ckpt_probe?", "max_tokens": 2}).encode()
    assert call("/v1/completions", words)[0] == 200  # the word in a prompt is no marker
    escaped = b'{"prompt": [1], "vllm_xargs": {"ckpt\\u005fprobe": 1}}'
    assert call("/v1/completions", escaped)[0] == 403
    # a GET with a body is read like a POST
    assert call("/v1/completions", probe, method="GET")[0] == 403


PROBE = {"prompt": [1], "max_tokens": 1, "vllm_xargs": {"ckpt_probe": 1}}


@pytest.mark.parametrize(
    "encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]
)
def test_probes_in_other_encodings_are_refused(encoding: str) -> None:
    """FastAPI decodes UTF-16/32 JSON (json.loads of bytes, with or without a BOM): the
    guard refuses it rather than read it otherwise."""
    body = json.dumps(PROBE).encode(encoding)
    assert json.loads(body) == PROBE  # what the server would read
    status, text, seen = call("/v1/completions", body)
    assert status == 415 and seen is None and b"UTF-8" in text
    plain = json.dumps({"prompt": [1], "max_tokens": 1}).encode(encoding)
    assert call("/v1/completions", plain)[0] == 415


def test_utf8_bom_is_read_as_the_server_reads_it() -> None:
    body = b"\xef\xbb\xbf" + json.dumps(PROBE).encode()
    assert call("/v1/completions", body)[0] == 403
    ok = b"\xef\xbb\xbf" + json.dumps({"prompt": [1]}).encode()
    assert call("/v1/completions", ok)[0] == 200


def test_bodies_the_guard_cannot_read_are_refused_never_a_500() -> None:
    deep = b'{"vllm_xargs": {"\\u0063kpt_probe": 1}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, text, seen = call("/v1/completions", deep)
    assert status == 400 and seen is None and b"deep" in text
    rpc = b'{"method": "ckpt_info", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert call("/collective_rpc", rpc, key=KEY)[0] == 403
    nested = {"vllm_xargs": {"ckpt_probe": 1}, "x": json.loads("[" * 200 + "]" * 200)}
    status, text, _ = call("/v1/completions", json.dumps(nested).encode())
    assert status == 400 and b"deeper" in text
    assert call("/v1/completions", b'{"prompt": "ckpt_probe" ')[0] == 400  # broken JSON
    assert call("/v1/completions", b"\x00\x00\x00{")[0] == 415


def test_compressed_and_form_bodies() -> None:
    import gzip

    gz = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    status, _, seen = call("/v1/completions", gzip.compress(json.dumps(PROBE).encode()), headers=gz)
    assert status == 415 and seen is None
    form = [(b"content-type", b"multipart/form-data; boundary=XX")]
    part = b'--XX\r\nContent-Disposition: form-data; name="vllm_xargs"\r\n\r\n{"ckpt_probe": 1}'
    assert call("/v1/audio/transcriptions", part + b"\r\n--XX--", headers=form)[0] == 403
    rfc2231 = part.replace(b'name="vllm_xargs"', b"name*=utf-8''vllm%5Fxargs")
    assert call("/v1/audio/transcriptions", rfc2231, headers=form)[0] == 403
    audio = b'--XX\r\nContent-Disposition: form-data; name="file"\r\n\r\n\x00\x01\\u\r\n--XX--'
    assert call("/v1/audio/transcriptions", audio, headers=form)[0] == 200
    url = [(b"content-type", b"application/x-www-form-urlencoded")]
    enc = b"vllm%5Fx%61rgs=%7B%22ckpt_probe%22%3A1%7D"
    assert call("/v1/audio/transcriptions", enc, headers=url)[0] == 403
    assert call("/v1/audio/transcriptions", b"model=m&language=en", headers=url)[0] == 200


def test_collective_rpc_runs_only_our_methods() -> None:
    ok = json.dumps({"method": "ckpt_update", "args": ["{}"]}).encode()
    assert call("/collective_rpc", ok, key=KEY)[0] == 200
    for bad in (b'{"method": "reload_weights"}', b"[1]", b"not json", b'{"method": null}'):
        status, text, _ = call("/collective_rpc", bad, key=KEY)
        assert status == 403 and b"collective_rpc" in text
        assert b"reload_weights" not in text  # refusals never echo the request
    utf16 = json.dumps({"method": "ckpt_update"}).encode("utf-16")
    assert call("/collective_rpc", utf16, key=KEY)[0] == 403


def test_websockets_only_on_serving_routes() -> None:
    out: list[dict] = []
    reached: list[str] = []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def send(m):
        out.append(m)

    g = guard.CkptGuard(app)
    for path in ("/pause", "/collective_rpc", "/v1/realtime"):
        asyncio.run(g({"type": "websocket", "path": path, "headers": []}, None, send))
    assert reached == ["/v1/realtime"]
    assert out == [{"type": "websocket.close", "code": 1008}] * 2


def test_no_key_configured_closes_every_guarded_route(monkeypatch) -> None:
    monkeypatch.delenv(guard.TOKEN_FILE_ENV, raising=False)
    assert guard.CkptGuard(lambda *a: None).verifier.key == b""
    assert guard.is_public("/v1/chat/completions") and not guard.is_public("/pause")


def test_extension_connects_only_to_agent_sockets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CKPT_IPC_DIR", str(tmp_path))
    assert endpoint_refusal(worker_endpoint("n1", 0)) == ""
    assert "ipc://" in endpoint_refusal("tcp://10.0.0.1:5555")
    assert endpoint_refusal(f"ipc://{tmp_path}/../x.sock")
    assert endpoint_refusal(f"ipc://{tmp_path}/sub/x.sock")
    assert endpoint_refusal(f"ipc://{tmp_path}/x.txt")
    os.symlink("/tmp/evil.sock", tmp_path / "link.sock")
    assert endpoint_refusal(f"ipc://{tmp_path}/link.sock")


@pytest.mark.parametrize(
    "endpoint, why",
    [
        ("ftp://127.0.0.1:8000", "http"),
        ("http://127.0.0.1", "port"),
        ("http://user:pw@127.0.0.1:8000", "without user"),
        ("http://127.0.0.1:8000/admin", "without user, path"),
        ("http://127.0.0.1:8000?x=1", "query"),
        ("http://169.254.169.254:80", "node's"),
        ("http://10.0.0.9:8000", "node's"),
        ("http://127.0.0.1:8000\n", "printable"),
        ("http://127.0.0.1:99999", "not a URL"),
        ("http://[::1:8000", "not a URL"),
    ],
)
def test_engine_endpoints_are_pinned_to_their_node(endpoint: str, why: str) -> None:
    assert why in engine_refusal(endpoint, ["127.0.0.1"])


def test_engine_endpoint_accepted() -> None:
    assert engine_refusal("http://127.0.0.1:8000", ["127.0.0.1"]) == ""
    assert engine_refusal("http://localhost:8000/", ["127.0.0.1"]) == ""
    assert engine_refusal("https://10.0.0.9:8000", ["10.0.0.9"]) == ""
    assert "not known" in engine_refusal("http://127.0.0.1:8000", [])
