"""ckptd's /metrics endpoint (`--metrics-listen`): the Prometheus text of one registry,
behind the same access policy as the gRPC API (a bearer token whose principal has the
reader or admin role: `authorization: Bearer ...`) and, where ckptd serves TLS, the same
certificate. Beyond loopback it needs TLS (or --insecure, which also drops the token).
Every connection has a deadline; a refusal says why and nothing else."""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ckpt_common.credentials import split_addr
from ckpt_daemon.security.auth import AccessPolicy, Role, listen_refusal

log = structlog.get_logger("ckptd.metrics")
CONN_TIMEOUT_S = 10.0
ROLES = frozenset({Role.READER, Role.ADMIN})


def refusal(policy: AccessPolicy, header: str) -> str:
    """Why a scrape with this Authorization header is refused; "" when it may read."""
    if not policy.enabled:
        return ""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "a bearer token with the reader role is needed"
    who = policy.from_token(token.strip())
    if who is None:
        return "unknown token"
    if not who.roles & ROLES:
        return f"{who.name} lacks role reader"
    return ""


def _handler(prom: CollectorRegistry, policy: AccessPolicy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = CONN_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?", 1)[0] != "/metrics":
                self._send(404, b"not found\n", "text/plain")
                return
            why = refusal(policy, self.headers.get("Authorization", ""))
            if why:
                self._send(401, why.encode() + b"\n", "text/plain", bearer=True)
                return
            self._send(200, generate_latest(prom), CONTENT_TYPE_LATEST)

        def _send(self, status: int, body: bytes, ctype: str, bearer: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if bearer:
                self.send_header("WWW-Authenticate", 'Bearer realm="ckptd"')
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ssl_ctx: ssl.SSLContext | None = None

    def __init__(self, addr: tuple[str, int], handler: Any, family: int) -> None:
        self.address_family = family
        super().__init__(addr, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONN_TIMEOUT_S)  # the TLS handshake too, in this request's thread
        if self.ssl_ctx is None:
            super().finish_request(request, client_address)
            return
        conn = self.ssl_ctx.wrap_socket(request, server_side=True)
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.info("metrics_connection_failed", peer=str(client_address[0]))


def serve(
    listen: str,
    prom: CollectorRegistry,
    policy: AccessPolicy,
    *,
    tls: tuple[str, str] | None = None,
) -> ThreadingHTTPServer:
    """Serves /metrics on `listen` in a daemon thread; tls: (cert, key) of ckptd."""
    why = listen_refusal(listen, tls=tls is not None, insecure=not policy.enabled)
    if why:
        raise ValueError(f"--metrics-listen: {why}")
    host, port = split_addr(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host or "127.0.0.1", int(port)), _handler(prom, policy), family)
    if tls is not None:
        server.ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.ssl_ctx.load_cert_chain(tls[0], tls[1])
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics_serving", listen=listen, tls=tls is not None, auth=policy.enabled)
    return server
