"""ckpt-agent entrypoint."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import structlog

from ckpt_agent.agent import Agent
from ckpt_agent.config import (
    NODE_ID_ENV,
    TRUSTED_FABRIC_ENV,
    AgentConfig,
    StoreOptions,
    default_daemon,
)
from ckpt_common.credentials import Credentials
from ckpt_common.logs import setup_logging
from ckpt_common.rendezvous import RendezvousError
from ckpt_common.sources import roots_from_env

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    """The agent's tunables, read once: flags, else their variables, else defaults."""
    return _config(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    d = AgentConfig()
    p = argparse.ArgumentParser(prog="ckpt-agent", description="ckptd node agent")
    p.add_argument("--daemon", default=default_daemon(), help="ckptd host:port")
    p.add_argument("--node-id", default=os.environ.get(NODE_ID_ENV, d.node_id))
    p.add_argument("--host", default=d.host, help="address peers reach this node at")
    p.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="cpu: devices to play (default 1); cuda: first N GPUs (default all), more than "
        "there are: ranks share them in turn (benchmarks emulating more ranks than GPUs)",
    )
    p.add_argument("--ipc-dir", default=d.ipc_dir)
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s)
    p.add_argument("--log-level", default=d.log_level)
    p.add_argument(
        "--p2p",
        choices=["auto", "on", "off"],
        default=d.p2p,
        help="register host stores with Mooncake for P2P joins (auto: if installed)",
    )
    p.add_argument(
        "--source-root",
        action="append",
        default=[],
        help="read push sources only under this directory (repeatable; env CKPT_SOURCE_ROOTS,"
        " ':'-separated; default /dev/shm, where Client.push_tensors stages)",
    )
    p.add_argument(
        "--trusted-fabric",
        action="store_true",
        default=os.environ.get(TRUSTED_FABRIC_ENV) == "1",
        help="the network between nodes is trusted: allows P2P (Mooncake has no "
        "authentication and listens on every interface; env CKPT_TRUSTED_FABRIC=1)",
    )
    _store_args(p)
    p.add_argument("--token-file", default="", help="bearer token (env CKPTD_TOKEN_FILE)")
    p.add_argument("--tls-ca", default="", help="CA that signed ckptd's certificate")
    p.add_argument("--tls-cert", default="", help="this agent's certificate (node id in SAN)")
    p.add_argument("--tls-key", default="", help="its private key")
    p.add_argument("--insecure", action="store_true", help="plaintext beyond loopback")
    return p


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--spare-stores",
        type=int,
        default=None,
        help="dropped host stores each worker keeps for the next versions (default: 1 on "
        "cuda, pinned; 0 on cpu). A trainer pushing a version per step with Publisher(keep=K) "
        "reuses memory from the start with K + 1",
    )
    p.add_argument(
        "--prealloc-store-gib",
        type=float,
        default=0.0,
        help="at start, fill each worker's spares with host stores of this size (pinned on "
        "cuda): at least a version's bytes on that device, at most twice them",
    )


def _config(a: argparse.Namespace) -> AgentConfig:
    slots = a.slots if a.slots is not None else (1 if a.device == "cpu" else 0)
    return AgentConfig(
        daemon=a.daemon,
        node_id=a.node_id,
        host=a.host,
        device=a.device,
        slots=slots,
        ipc_dir=a.ipc_dir,
        heartbeat_s=a.heartbeat_s,
        log_level=a.log_level,
        p2p=a.p2p,
        source_roots=tuple(a.source_root) or roots_from_env(),
        trusted_fabric=a.trusted_fabric,
        stores=StoreOptions(spares=a.spare_stores, prealloc_bytes=int(a.prealloc_store_gib * GIB)),
        credentials=Credentials(
            token_file=a.token_file,
            tls_ca=a.tls_ca,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            insecure=a.insecure,
        ),
    )


async def _run(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
    except ValueError as e:  # a flag or tunable out of range: stop here, saying which
        raise SystemExit(f"ckpt-agent: {e}") from None
    setup_logging(json=True, level=cfg.log_level, service="ckpt-agent", node=cfg.node_id)
    try:
        asyncio.run(_run(cfg))
    except RendezvousError as e:  # an IPC dir someone else could control: never adopted
        structlog.get_logger("ckpt_agent").error("ipc_dir_refused", reason=str(e))
        raise SystemExit(f"ckpt-agent: {e}") from None


if __name__ == "__main__":
    main()
