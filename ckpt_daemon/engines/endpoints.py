"""Which engine endpoints ckptd will call (pure). ckptd POSTs to an instance's endpoint, so a
registered endpoint is an SSRF vector unless it is pinned to the engine's own node: an
http(s) origin (no user info, path, query or fragment) whose host is the host of one of the
instance's agents (as the agent reported it), or loopback when that agent is on loopback."""

from __future__ import annotations

import urllib.parse

from ckpt_common.credentials import is_loopback_host

MAX_ENDPOINT = 256


def endpoint_refusal(endpoint: str, agent_hosts: list[str]) -> str:
    """Why `endpoint` may not be called; "" when it may. agent_hosts: the --host of each
    agent the instance's ranks sit on."""
    if len(endpoint) > MAX_ENDPOINT or not endpoint.isprintable() or " " in endpoint:
        return f"an endpoint is at most {MAX_ENDPOINT} printable characters without spaces"
    try:
        u = urllib.parse.urlsplit(endpoint)
        port = u.port
    except ValueError:
        return "the endpoint is not a URL"
    if u.scheme not in ("http", "https"):
        return "the endpoint must be http:// or https://"
    if u.username or u.password or u.query or u.fragment or u.path not in ("", "/"):
        return "the endpoint must be scheme://host:port, without user, path, query or fragment"
    host = u.hostname or ""
    if not host or port is None:
        return "the endpoint must name a host and a port"
    if not agent_hosts:
        return "the instance's agents are not known: attach them first"
    if host in agent_hosts or any(
        is_loopback_host(host) and is_loopback_host(a) for a in agent_hosts
    ):
        return ""
    return (
        f"the endpoint's host must be its node's (the agent's --host: {sorted(set(agent_hosts))})"
    )


def origin(endpoint: str) -> str:
    """scheme://host:port of a valid endpoint."""
    u = urllib.parse.urlsplit(endpoint)
    return f"{u.scheme}://{u.netloc}"
