"""Engine credentials under attack, with real processes: ckptd (an auth file with roles), an
agent, a real vllm_ext.guard in front of a small ASGI app served by uvicorn on loopback (the
engine), and an endpoint the attacker controls, which records every request and relays
proof challenges to the real engine. An autoscaler token registers and joins instances at
that endpoint; an operator updates an instance whose engine's port the attacker took. The
endpoint never receives a reusable secret, nothing it captured opens the real engine, and
each attempt fails with a precise reason. /metrics needs a reader's token."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.client import Client
from ckpt_common import engine_auth as ea
from ckpt_common.credentials import Credentials
from ckpt_common.errors import FailedPrecondition
from ckpt_daemon.security.certs import add_token
from demo.engines import free_port
from tests.support.cluster import Cluster
from tests.support.tensors import mixed_tensors, write_sharded
from vllm_ext.guard import CkptGuard
from vllm_ext.guard_auth import Verifier

pytestmark = pytest.mark.slow
SECRET_HEADERS = ("x-ckpt-token", "x-ckpt-signature", "authorization")


class GuardedEngine:
    """vllm_ext.guard in front of an app that records what reached it (uvicorn, loopback)."""

    def __init__(self, key: bytes, port: int = 0) -> None:
        import uvicorn

        self.reached: list[tuple[str, str]] = []

        async def app(scope, receive, send):
            self.reached.append((scope["method"], scope["path"]))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = CkptGuard(app)
        guard.verifier = Verifier(key)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            guard, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning"
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Attacker:
    """Records every request; relays proof challenges to `relay` (the real engine)."""

    def __init__(self, relay: str, port: int = 0) -> None:
        self.captured: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.captured.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                status, answer = 200, b"{}"
                if self.path.startswith(ea.PROOF_PATH):
                    try:
                        with urllib.request.urlopen(relay + self.path, timeout=5) as r:
                            status, answer = r.status, r.read()
                    except (urllib.error.URLError, OSError):
                        status, answer = 502, b"{}"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_PUT = _any  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def replay(captured: list[dict], url: str) -> list[int]:
    """Sends every captured request, as captured, to `url`; their statuses."""
    out = []
    for r in captured:
        req = urllib.request.Request(
            url + r["path"], data=r["body"] or None, method=r["method"], headers=r["headers"]
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                out.append(resp.status)
        except urllib.error.HTTPError as e:
            out.append(e.code)
    return out


def tokens(tmp_path: Path) -> Path:
    f = tmp_path / "auth.json"
    for name, roles, node in (
        ("admin", "admin", ""),
        ("scaler", "autoscaler", ""),
        ("reader", "reader", ""),
        ("agent-n1", "agent", "n1"),
    ):
        # the admin pushes files of this test's own user (under pytest's 0700 tmp dirs)
        uid = os.getuid() if name == "admin" else None
        add_token(f, name, roles.split(","), node, tmp_path / f"{name}.token", uid=uid)
    return f


def client(c: Cluster, tmp_path: Path, name: str) -> Client:
    return Client(c.addr, credentials=Credentials(token_file=str(tmp_path / f"{name}.token")))


def vllm_instance(name: str, endpoint: str) -> tpb.Instance:
    return tpb.Instance(
        name=name,
        kind=tpb.INSTANCE_VLLM,
        endpoint=endpoint,
        ranks=[tpb.InstanceRank(node_id="n1", device=0)],
    )


def scrape(port: int, token_file: Path | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_an_endpoint_never_gets_a_reusable_secret(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    c.env["CKPTD_TOKEN_FILE"] = str(tmp_path / "agent-n1.token")
    metrics_port = free_port()
    engine = attacker = taker = other = None
    try:
        c.start_daemon(
            "--auth-file", str(tokens(tmp_path)), "--metrics-listen", f"127.0.0.1:{metrics_port}"
        )
        c.client.close()
        c.client = client(c, tmp_path, "admin")
        scaler = client(c, tmp_path, "scaler")
        c.start_agent("n1", 1)
        c.wait_ranks(1)
        engine = GuardedEngine(c.engine_key("real"))
        scaler.register_instance(vllm_instance("real", engine.url))  # its engine proves it
        attacker = Attacker(relay=engine.url)
        # a new name at the attacker's endpoint: the relayed proof is for another key
        with pytest.raises(FailedPrecondition, match="did not prove .*does not match"):
            scaler.register_instance(vllm_instance("evil", attacker.url))
        # the real instance's name moved to the attacker's endpoint: the relayed proof names
        # the address the real engine was reached on, not the attacker's
        with pytest.raises(FailedPrecondition, match="did not prove .*the proof is for"):
            scaler.register_instance(vllm_instance("real", attacker.url))
        for name in ("evil", "real"):
            with pytest.raises(FailedPrecondition, match="did not prove"):
                scaler.join(vllm_instance(name, attacker.url), "m", 1)
        insts = {i.name: i for i in c.client.instances()}
        assert set(insts) == {"real"} and insts["real"].endpoint == engine.url

        # the engine goes away and the attacker takes its port, relaying challenges to the
        # engine of another instance (relaying to its own endpoint would loop): an update
        # fails at the proof
        c.client.push("m", 1, [str(write_sharded(mixed_tensors(1, layers=1), tmp_path / "w"))])
        engine.stop()
        other = GuardedEngine(c.engine_key("other"))
        taker = Attacker(relay=other.url, port=engine.port)
        job = c.client.wait(c.client.update("m", 1, instances=["real"]).id, 60)
        assert job.state == tpb.JOB_FAILED
        assert "instance real" in job.reason and "did not prove" in job.reason, job.reason

        captured = attacker.captured + taker.captured
        # only proof challenges, and the public liveness check made before planning
        assert captured and all(
            r["path"].startswith(ea.PROOF_PATH) or r["path"] == "/health" for r in captured
        ), [r["path"] for r in captured]
        for r in captured:
            assert r["method"] == "GET" and not r["body"]
            assert not set(r["headers"]) & set(SECRET_HEADERS), r["headers"]
        # whatever it captured, replayed against the real engine, opens nothing
        taker.stop()
        engine = GuardedEngine(c.engine_key("real"))
        captured = [r for r in captured if r["path"] != "/health"]  # public: opens nothing
        replay(captured, engine.url)
        for path in ("/pause", "/collective_rpc", "/resume", "/update_weight_version"):
            for r in captured:
                got = replay([{**r, "method": "POST", "path": path}], engine.url)
                assert got == [403], path
        assert engine.reached == []

        # /metrics: a reader's token, nothing less
        assert scrape(metrics_port, None)[0] == 401
        assert scrape(metrics_port, tmp_path / "scaler.token")[0] == 401
        status, text = scrape(metrics_port, tmp_path / "reader.token")
        assert status == 200 and "ckptd_agents_attached 1.0" in text
    finally:
        for s in (engine, attacker, taker, other):
            if s is not None:
                s.stop()
        c.close()


def test_metrics_over_tls_with_a_reader_token(tmp_path: Path) -> None:
    import ssl

    from prometheus_client import CollectorRegistry, Counter

    from ckpt_daemon.observe import metrics_http
    from ckpt_daemon.security.auth import AccessPolicy, Principal, Role, token_digest
    from ckpt_daemon.security.certs import make_certs

    make_certs(tmp_path, [], [], [])
    prom = CollectorRegistry()
    Counter("ckptd_test", "a counter", registry=prom).inc()
    policy = AccessPolicy(
        tokens={
            token_digest("r"): Principal(name="r", roles=frozenset({Role.READER})),
            token_digest("t"): Principal(name="t", roles=frozenset({Role.TRAINER})),
        }
    )
    tls = (str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    server = metrics_http.serve("127.0.0.1:0", prom, policy, tls=tls)
    try:
        url = f"https://localhost:{server.server_port}/metrics"
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        for token, want in ((None, 401), ("t", 401), ("x", 401), ("r", 200)):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(url, headers=headers), timeout=5, context=ctx
                ) as r:
                    status, text = r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                status, text = e.code, ""
            assert status == want, token
        assert "ckptd_test_total 1.0" in text
        with pytest.raises(OSError):  # plaintext to the TLS port
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_refuse_plaintext_beyond_loopback() -> None:
    from ckpt_daemon.observe import metrics_http
    from ckpt_daemon.security.auth import AccessPolicy

    with pytest.raises(ValueError, match="beyond loopback"):
        metrics_http.serve("0.0.0.0:0", None, AccessPolicy(tokens={}))  # type: ignore[arg-type]
    assert metrics_http.refusal(AccessPolicy(tokens={}), "Bearer x") == "unknown token"
    assert metrics_http.refusal(AccessPolicy(enabled=False), "") == ""
    assert "bearer token" in metrics_http.refusal(AccessPolicy(tokens={}), "Basic x")


def test_engine_key_command_derives_each_instance_key(tmp_path: Path) -> None:
    import os
    import subprocess

    from tests.support.cluster import PY, REPO

    master = tmp_path / "engine.token"
    master.write_text("ab" * 16)
    out = tmp_path / "a.key"
    cmd = [PY, "-m", "ckpt_daemon.main", "engine-key", "--master", str(master), "--instance"]
    subprocess.run([*cmd, "A", "--out", str(out)], check=True, cwd=REPO, timeout=60)
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert out.read_bytes().strip() == ea.instance_key(b"ab" * 16, "A")
    assert ea.instance_key(b"ab" * 16, "A") != ea.instance_key(b"ab" * 16, "B")
    master.write_text("short")
    r = subprocess.run([*cmd, "A", "--out", "-"], capture_output=True, cwd=REPO, timeout=60)
    assert r.returncode != 0 and b"at least 16 bytes" in r.stderr
