"""vllm_ext.guard as ASGI (a minimal app behind it), and the engine-side endpoint checks.
The same guard in front of real vLLM engines: tests/test_vllm_e2e.py."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from ckpt_common.ipc import endpoint_refusal, worker_endpoint
from ckpt_daemon.endpoints import endpoint_refusal as engine_refusal
from vllm_ext import guard

TOKEN = b"s3cret"


def call(path: str, body: bytes = b"", method: str = "POST", token: bytes | None = None):
    seen: dict = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg.get("body", b"")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    g = guard.CkptGuard(app)
    g.token = TOKEN
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"X-Ckpt-Token", token))
    scope = {"type": "http", "path": path, "method": method, "headers": headers}
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
def test_admin_routes_need_the_token(path: str) -> None:
    status, text, _ = call(path, b"{}")
    assert status == 403 and b"engine token" in text
    status, _, _ = call(path, b"{}", token=b"wrong")
    assert status == 403


def test_serving_routes_stay_open_but_probes_need_the_token() -> None:
    body = json.dumps({"prompt": [1, 2], "max_tokens": 2}).encode()
    status, _, seen = call("/v1/completions", body)
    assert status == 200 and seen == body  # the body reaches the app whole
    assert call("/health", method="GET")[0] == 200
    assert call("/v1/models", method="GET")[0] == 200
    probe = json.dumps({"prompt": [1], "vllm_xargs": {"ckpt_probe": 1}}).encode()
    status, text, _ = call("/v1/completions", probe)
    assert status == 403 and b"ckpt_probe" in text
    assert call("/v1/completions", probe, token=TOKEN)[0] == 200
    words = json.dumps({"prompt": "what is ckpt_probe?", "max_tokens": 2}).encode()
    assert call("/v1/completions", words)[0] == 200  # the word in a prompt is no marker
    escaped = b'{"prompt": [1], "vllm_xargs": {"ckpt\\u005fprobe": 1}}'
    assert call("/v1/completions", escaped)[0] == 403


def test_collective_rpc_runs_only_our_methods() -> None:
    ok = json.dumps({"method": "ckpt_update", "args": ["{}"]}).encode()
    assert call("/collective_rpc", ok, token=TOKEN)[0] == 200
    for bad in (b'{"method": "reload_weights"}', b"[1]", b"not json", b'{"method": null}'):
        status, text, _ = call("/collective_rpc", bad, token=TOKEN)
        assert status == 403 and b"collective_rpc" in text
        assert b"reload_weights" not in text  # refusals never echo the request


def test_no_token_configured_closes_every_guarded_route(monkeypatch) -> None:
    monkeypatch.delenv(guard.TOKEN_FILE_ENV, raising=False)
    assert guard.CkptGuard(lambda *a: None).token == b""
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
