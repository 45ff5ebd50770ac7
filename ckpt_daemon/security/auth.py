"""Who may call what on ckptd: principals, roles, the access policy, and the interceptor.

Principals come from a bearer token (`authorization: Bearer ...`) or a TLS client
certificate (SAN URI spiffe://ckpt/agent/<node> or spiffe://ckpt/client/<name>). Roles:

- trainer: PushCheckpoint, BeginPush, CommitPush
- operator: Update, CancelJob, DeleteCheckpoint, RemoveAgent
- autoscaler: RegisterInstance, JoinInstance, RemoveInstance
- reader: Get/List/Watch
- agent: AgentLink.Attach, as the node its identity names (agents.AgentHub checks the Hello)
- admin: everything

Health checks need nothing (they expose no data); reflection needs any principal; a method
not listed here is refused to everyone (fail closed). `authorize` is the pure decision.

Policy sources: an auth file (`ckptd --auth-file`, JSON, below), else the local admin token
ckptd writes (0600) into its state dir, so that on one machine only ckptd's user (and root)
can call it. `--insecure` turns authentication off, explicitly.

    {"tokens": [{"name": "trainer-1", "sha256": "<hex of the token>", "roles": ["trainer"],
                 "uid": 1000},
                {"name": "agent-n1", "sha256": "...", "roles": ["agent"], "node": "n1"}],
     "clients": {"ops": ["operator", "reader"],
                 "trainer-2": {"roles": ["trainer"], "uid": 1001}}}

`uid`: the local user a principal acts as. Agents read the files it pushes as that user
could (ckpt_common.read_as); a principal without one (and everyone under --insecure) may
push only files every user may read. The local admin token acts as ckptd's own user.
"""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from ckpt_common.credentials import (
    ADMIN_TOKEN_FILE,
    AGENT_URI,
    CLIENT_URI,
    is_loopback_host,
    split_addr,
)

log = structlog.get_logger("ckptd.auth")


class Role(str, enum.Enum):
    TRAINER = "trainer"
    OPERATOR = "operator"
    AUTOSCALER = "autoscaler"
    READER = "reader"
    AGENT = "agent"
    ADMIN = "admin"


_R = Role
CKPT = "/ckpt.v1.Ckpt/"
METHOD_ROLES: dict[str, Role] = {
    **{CKPT + m: _R.TRAINER for m in ("PushCheckpoint", "BeginPush", "CommitPush")},
    **{CKPT + m: _R.OPERATOR for m in ("Update", "CancelJob", "DeleteCheckpoint", "RemoveAgent")},
    **{CKPT + m: _R.AUTOSCALER for m in ("RegisterInstance", "JoinInstance", "RemoveInstance")},
    **{
        CKPT + m: _R.READER
        for m in (
            "GetCheckpoint",
            "ListCheckpoints",
            "GetJob",
            "ListJobs",
            "WatchJob",
            "ListAgents",
            "ListInstances",
        )
    },
    "/ckpt.v1.AgentLink/Attach": _R.AGENT,
}
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)
ANY_PRINCIPAL_PREFIXES = ("/grpc.reflection.",)


@dataclass(frozen=True, kw_only=True)
class Principal:
    name: str
    roles: frozenset[Role]
    node: str = ""  # agents: the only node id this principal may attach as
    uid: int | None = None  # the local user it acts as (push reads); None: nobody in particular


def authorize(method: str, who: Principal | None) -> str:
    """Why `who` may not call `method`; "" when it may."""
    if method.startswith(PUBLIC_PREFIXES):
        return ""
    if who is None:
        return "no credentials: send a bearer token or a client certificate"
    if method.startswith(ANY_PRINCIPAL_PREFIXES):
        return ""
    need = METHOD_ROLES.get(method)
    if need is None:
        return f"{method} is not a ckptd method"
    if need in who.roles or Role.ADMIN in who.roles:  # admin: the local token runs agents too
        return ""
    return f"{who.name} lacks role {need.value} for {method.rsplit('/', 1)[-1]}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AccessPolicy:
    """None of this is secret: tokens are kept as sha256 digests."""

    tokens: dict[str, Principal] = field(default_factory=dict)  # digest -> principal
    clients: dict[str, Principal] = field(default_factory=dict)  # cert name -> principal
    enabled: bool = True  # False: --insecure, everyone may call everything

    def from_token(self, token: str) -> Principal | None:
        digest = token_digest(token)
        for known, who in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return who
        return None

    def from_uris(self, uris: list[str]) -> Principal | None:
        for uri in uris:
            if uri.startswith(AGENT_URI) and len(uri) > len(AGENT_URI):
                node = uri[len(AGENT_URI) :]
                return Principal(name=f"agent/{node}", roles=frozenset({Role.AGENT}), node=node)
            if uri.startswith(CLIENT_URI) and len(uri) > len(CLIENT_URI):
                name = uri[len(CLIENT_URI) :]
                return self.clients.get(name) or Principal(name=name, roles=frozenset())
        return None


def _roles(raw: Any, where: str) -> frozenset[Role]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: roles must be a non-empty list")
    try:
        return frozenset(Role(r) for r in raw)
    except ValueError:
        raise ValueError(f"{where}: roles must be among {[r.value for r in Role]}") from None


def _uid(raw: Any, where: str) -> int | None:
    if raw is None:
        return None
    if type(raw) is not int or not 0 <= raw < 2**32 - 1:
        raise ValueError(f"{where}: uid must be a local user id (an integer)")
    return raw


def _token(i: int, t: Any, where: str) -> tuple[str, Principal]:
    if not isinstance(t, dict) or set(t) - {"name", "sha256", "roles", "node", "uid"}:
        raise ValueError(f"{where}: want name, sha256, roles[, node][, uid]")
    digest = str(t.get("sha256", "")).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"{where}: sha256 must be 64 hex digits")
    roles = _roles(t.get("roles"), where)
    node = str(t.get("node", ""))
    if Role.AGENT in roles and not node:
        raise ValueError(f"{where}: an agent token must name its node")
    name = str(t.get("name") or f"token-{i}")
    return digest, Principal(name=name, roles=roles, node=node, uid=_uid(t.get("uid"), where))


def _client(name: str, raw: Any, where: str) -> Principal:
    """A certificate name's entry: its roles, or {"roles": [...], "uid": N}."""
    if isinstance(raw, dict):
        if set(raw) - {"roles", "uid"}:
            raise ValueError(f"{where}: want roles[, uid]")
        return Principal(
            name=name, roles=_roles(raw.get("roles"), where), uid=_uid(raw.get("uid"), where)
        )
    return Principal(name=name, roles=_roles(raw, where))


def load_policy(path: str) -> AccessPolicy:
    """Parses an auth file (module docstring); ValueError says what is wrong."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict) or set(d) - {"tokens", "clients"}:
        raise ValueError(f"{path}: want an object with tokens and clients")
    tokens = dict(_token(i, t, f"{path}: tokens[{i}]") for i, t in enumerate(d.get("tokens", [])))
    clients = {
        str(n): _client(str(n), r, f"{path}: clients[{n!r}]")
        for n, r in d.get("clients", {}).items()
    }
    return AccessPolicy(tokens=tokens, clients=clients)


def local_admin_policy(state_dir: str) -> tuple[AccessPolicy, str]:
    """The policy of a ckptd without an auth file: one admin token, created once, 0600 in a
    0700 state dir. Returns the policy and the token file's path."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"{path} must be a file of ckptd's user, mode 0600")
    with open(path) as f:
        token = f.read().strip()
    admin = Principal(name="local-admin", roles=frozenset({Role.ADMIN}), uid=os.getuid())
    return AccessPolicy(tokens={token_digest(token): admin}), path


def listen_refusal(listen: str, *, tls: bool, insecure: bool) -> str:
    """Why ckptd must not serve on `listen`; "". Beyond loopback: TLS (and authentication,
    always on unless --insecure), or an explicit --insecure."""
    host = split_addr(listen)[0]
    if insecure or is_loopback_host(host) or tls:
        return ""
    return (
        f"{listen} is reachable beyond loopback: serve it with --tls-cert/--tls-key "
        "(and an --auth-file), or start ckptd with --insecure to accept plaintext"
    )


# ------------------------------------------------------------------ the gRPC side

PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ckpt_principal", default=None
)


def read_uid() -> int | None:
    """The local uid whose permissions the current call's push reads follow: its principal's
    (None: a principal without one, or no authentication at all)."""
    who = PRINCIPAL.get()
    return who.uid if who is not None else None


def _peer_uris(context: grpc.aio.ServicerContext) -> list[str]:
    pem = (context.auth_context() or {}).get("x509_pem_cert")
    if not pem:
        return []
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem[0])
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def principal_of(
    policy: AccessPolicy, metadata: Any, context: grpc.aio.ServicerContext
) -> Principal | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return policy.from_token(value[len("Bearer ") :].strip())
    return policy.from_uris(_peer_uris(context))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call against the policy before its handler runs."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self._policy.enabled:
            return handler
        method = details.method

        async def check(context: grpc.aio.ServicerContext) -> None:
            who = principal_of(self._policy, details.invocation_metadata, context)
            why = authorize(method, who)
            if why:
                log.warning("denied", method=method, principal=who.name if who else "")
                code = (
                    grpc.StatusCode.UNAUTHENTICATED
                    if who is None
                    else grpc.StatusCode.PERMISSION_DENIED
                )
                await context.abort(code, why)
            PRINCIPAL.set(who)

        return _guarded(handler, check)


def _guarded(handler: grpc.RpcMethodHandler, check: Callable[..., Awaitable[None]]) -> Any:
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def uu(request: Any, context: Any) -> Any:
            await check(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(uu, **kw)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def su(requests: Any, context: Any) -> Any:
            await check(context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, **kw)
    inner = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: Any) -> Any:
        await check(context)
        out = inner(request, context)
        if hasattr(out, "__aiter__"):
            async for item in out:
                yield item
        else:
            await out  # a handler that writes with context.write

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)
