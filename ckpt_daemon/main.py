"""ckptd entrypoint: set up logging, parse, build, run, close in finally."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog

from ckpt_common.envflags import apply_env_defaults
from ckpt_common.logs import setup_logging
from ckpt_daemon.api.server import start_daemon
from ckpt_daemon.config import LISTEN_ENV, STATE_DIR_ENV, DaemonConfig

# ckptd's own TLS files: CKPTD_TLS_* name what clients and agents show ckptd
SERVER_ENV_NAMES = {
    "--tls-cert": "CKPTD_SERVER_TLS_CERT",
    "--tls-key": "CKPTD_SERVER_TLS_KEY",
    "--tls-ca": "CKPTD_SERVER_TLS_CA",
}


def parse_args(argv: list[str] | None = None) -> DaemonConfig:
    """ckptd's tunables, read once: flags, else their CKPTD_* variables, else defaults."""
    return _config(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    d = DaemonConfig()
    p = argparse.ArgumentParser(prog="ckptd", description="ckptd: live weight-update coordinator")
    p.add_argument(
        "--listen",
        default=os.environ.get(LISTEN_ENV, d.listen),
        help="host:port to serve gRPC on (port 0: pick one)",
    )
    p.add_argument("--state-dir", default=os.environ.get(STATE_DIR_ENV, d.state_dir))
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s)
    p.add_argument("--update-timeout-s", type=float, default=d.update_timeout_s)
    p.add_argument("--receiver-timeout-s", type=float, default=d.receiver_timeout_s)
    p.add_argument(
        "--max-bucket-mib",
        type=int,
        default=0,
        help="cap on the bucket size (default: 64 on CPU, 512 on CUDA)",
    )
    p.add_argument(
        "--drain-s",
        type=float,
        default=d.drain_s,
        help="on SIGTERM, running jobs get this long to end (new ones are refused) before "
        "they are cancelled",
    )
    p.add_argument("--port-file", default="", help="write the bound port here once serving")
    p.add_argument(
        "--metrics-listen",
        default="",
        help="host:port to serve Prometheus metrics on (e.g. 127.0.0.1:9601)",
    )
    p.add_argument(
        "--otel-endpoint",
        default="",
        help="OpenTelemetry spans per job and rank, OTLP/HTTP to this URL (e.g. "
        "http://127.0.0.1:4318/v1/traces; http only to loopback); off when empty",
    )
    p.add_argument(
        "--no-host-deltas",
        action="store_true",
        help="do not diff a pushed version in the host stores against the version its "
        "instances serve (a CPU pass over both; trainers' delta pushes still work)",
    )
    add_security_args(p)
    apply_env_defaults(p, "CKPTD_", SERVER_ENV_NAMES)
    return p


def _config(a: argparse.Namespace) -> DaemonConfig:
    extra = {}
    if a.max_bucket_mib:
        extra = {
            "max_bucket_bytes_cpu": a.max_bucket_mib << 20,
            "max_bucket_bytes_cuda": a.max_bucket_mib << 20,
        }
    return DaemonConfig(
        listen=a.listen,
        state_dir=a.state_dir,
        heartbeat_s=a.heartbeat_s,
        update_timeout_s=a.update_timeout_s,
        receiver_timeout_s=a.receiver_timeout_s,
        port_file=a.port_file,
        drain_s=a.drain_s,
        metrics_listen=a.metrics_listen,
        otel_endpoint=a.otel_endpoint,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_ca=a.tls_ca,
        auth_file=a.auth_file,
        insecure=a.insecure,
        engine_token_file=a.engine_token_file,
        host_deltas=not a.no_host_deltas,
        **extra,
    )


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default="", help="ckptd's certificate chain (PEM)")
    p.add_argument("--tls-key", default="", help="its private key (PEM)")
    p.add_argument(
        "--tls-ca", default="", help="CA of client certificates: every peer must show one (mTLS)"
    )
    p.add_argument(
        "--auth-file",
        default="",
        help="tokens and client-certificate roles (JSON, see ckpt_daemon/security/auth.py); "
        "default: a local admin token in the state dir",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no authentication, and plaintext even beyond loopback (trusted networks only)",
    )
    p.add_argument(
        "--engine-token-file",
        default="",
        help="master secret of the engine keys: ckptd signs each request to a vLLM engine "
        "(vllm_ext.guard) with its instance's key (`ckptd engine-key`), once the engine proved "
        "it holds it; no key is ever sent",
    )


async def _run(cfg: DaemonConfig) -> None:
    daemon = await start_daemon(cfg)
    port_file = cfg.port_file
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(daemon.port))
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        structlog.get_logger("ckptd").info("ckptd_stopping")
        await daemon.stop()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["certs"], ["token"]):
        from ckpt_daemon.security.certs import main as certs_main

        certs_main(args)
        return
    if args[:1] == ["engine-key"]:
        from ckpt_daemon.engines.keys import main as engine_key_main

        engine_key_main(args[1:])
        return
    setup_logging(json=True, service="ckptd")
    cfg = parse_args(args)
    try:
        import uvloop

        uvloop.run(_run(cfg))
    except ImportError:
        asyncio.run(_run(cfg))


if __name__ == "__main__":
    main()
