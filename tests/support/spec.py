"""What a test cluster is made of, declared up front: ckptd's flags, its agents, reference
receivers and the instances they form, credentials. `tests.support.cluster.start` makes one;
the fixtures in tests/conftest.py hand it to a test or a module."""

from __future__ import annotations

from dataclasses import dataclass

Env = tuple[tuple[str, str], ...]


@dataclass(frozen=True, kw_only=True)
class Node:
    """An agent: its node id, how many devices it serves (--slots), its own flags and any
    environment set for it alone (on top of the cluster's)."""

    id: str
    devices: int = 1
    args: tuple[str, ...] = ()
    env: Env = ()

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("a node needs an id")
        if self.devices < 1:
            raise ValueError(f"node {self.id}: devices must be >= 1, got {self.devices}")


@dataclass(frozen=True, kw_only=True)
class Receivers:
    """Reference receivers (vllm_ext.reference) on `devices` of `node`. With `instance`, they
    are registered as one instance of that name (TP = len(devices)) once they listen;
    without, they run unregistered. In `args` and the values of `env`, "{device}" is the
    receiver's device."""

    node: str
    devices: tuple[int, ...] = (0,)
    instance: str = ""
    args: tuple[str, ...] = ()
    env: Env = ()

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError(f"receivers on {self.node}: no devices")

    def args_for(self, device: int) -> list[str]:
        return [a.replace("{device}", str(device)) for a in self.args]

    def env_for(self, device: int) -> dict[str, str]:
        return {k: v.replace("{device}", str(device)) for k, v in self.env}


@dataclass(frozen=True, kw_only=True)
class Token:
    """A token in ckptd's auth file (ckpt_daemon.security.certs.add_token), written to
    <root>/<name>.token; uid: the local user it acts as."""

    name: str
    roles: tuple[str, ...]
    node: str = ""
    uid: int | None = None


@dataclass(frozen=True, kw_only=True)
class Auth:
    """ckptd with --auth-file: these tokens; agents present `agent`'s token, the cluster's
    client `client`'s (Cluster.client_as(name) is a client with any other)."""

    tokens: tuple[Token, ...]
    agent: str
    client: str

    def __post_init__(self) -> None:
        names = {t.name for t in self.tokens}
        for who in (self.agent, self.client):
            if who not in names:
                raise ValueError(f"auth: no token named {who!r}")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """ckptd on port 0 (--heartbeat-s 0.5, its engine token file), then `nodes`' agents,
    then `receivers`; ready once every node's devices are attached, every receiver listens
    and its instance is registered (each within start_timeout_s)."""

    nodes: tuple[Node, ...] = ()
    receivers: tuple[Receivers, ...] = ()
    receiver_timeout_s: float | None = None  # ckptd's --receiver-timeout-s (None: its default)
    daemon_args: tuple[str, ...] = ()  # more of ckptd's flags
    env: Env = ()  # for every process of the cluster
    auth: Auth | None = None
    start_timeout_s: float = 60

    def __post_init__(self) -> None:
        ids = [n.id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"node ids repeat: {ids}")
        for r in self.receivers:
            if r.node not in ids:
                raise ValueError(f"receivers on {r.node}: no such node in {ids}")
        instances = [r.instance for r in self.receivers if r.instance]
        if len(set(instances)) != len(instances):
            raise ValueError(f"instance names repeat: {instances}")

    def daemon_flags(self) -> list[str]:
        flags = list(self.daemon_args)
        if self.receiver_timeout_s is not None:
            flags = ["--receiver-timeout-s", f"{self.receiver_timeout_s:g}", *flags]
        return flags

    @property
    def ranks(self) -> int:
        return sum(n.devices for n in self.nodes)
