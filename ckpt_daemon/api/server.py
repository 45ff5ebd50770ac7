"""Builds and runs ckptd: registry, agent hub, pusher, job runner, gRPC server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ckpt.v1 import ckptd_pb2, ckptd_pb2_grpc
from ckpt_daemon import __version__
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.api.servicer import AgentLinkServicer, CkptServicer, add_agent_link
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.engines.keys import load_keys
from ckpt_daemon.engines.trigger import EngineTrigger
from ckpt_daemon.jobs.runner import JobRunner
from ckpt_daemon.model import Job
from ckpt_daemon.observe.metrics import Metrics
from ckpt_daemon.observe.tracing import JobTracer
from ckpt_daemon.push.pusher import Pusher
from ckpt_daemon.registry.store import Registry
from ckpt_daemon.security.auth import (
    AccessPolicy,
    AuthInterceptor,
    listen_refusal,
    load_policy,
    local_admin_policy,
)

log = structlog.get_logger("ckptd")
SERVICE_NAME = ckptd_pb2.DESCRIPTOR.services_by_name["Ckpt"].full_name
MAX_MESSAGE = 512 << 20


@dataclass
class Daemon:
    config: DaemonConfig
    registry: Registry
    hub: AgentHub
    jobs: JobRunner
    server: grpc.aio.Server
    port: int
    metrics_port: int = 0
    tracer: JobTracer | None = None
    _monitor: asyncio.Task[None] | None = None
    _reconciler: asyncio.Task[None] | None = None

    async def stop(self, grace: float = 2.0) -> None:
        """Drains (running jobs end on their own for up to config.drain_s, new ones are
        refused), then stops serving and cancels what still runs."""
        await self.jobs.drain(self.config.drain_s)
        for task in (self._monitor, self._reconciler):
            if task:
                task.cancel()
        await self.server.stop(grace)
        await self.jobs.close()
        self.registry.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.close)


def access_policy(config: DaemonConfig) -> AccessPolicy:
    if config.insecure:
        log.warning("authentication_off", listen=config.listen)
        return AccessPolicy(enabled=False)
    if config.auth_file:
        return load_policy(config.auth_file)
    policy, path = local_admin_policy(config.state_dir)
    log.info("local_admin_token", path=path)
    return policy


def server_credentials(config: DaemonConfig) -> grpc.ServerCredentials:
    def read(p: str) -> bytes:
        with open(p, "rb") as f:
            return f.read()

    return grpc.ssl_server_credentials(
        [(read(config.tls_key), read(config.tls_cert))],
        root_certificates=read(config.tls_ca) if config.tls_ca else None,
        # with a client CA, every peer shows a certificate it signed (mTLS); without, peers
        # prove themselves with tokens only
        require_client_auth=bool(config.tls_ca),
    )


async def _serve(
    config: DaemonConfig,
    policy: AccessPolicy,
    servicer: CkptServicer,
    link: AgentLinkServicer,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server on config.listen (TLS when configured), health and reflection
    included, started and SERVING; its port."""
    opts = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]
    server = grpc.aio.server(options=opts, interceptors=[AuthInterceptor(policy)])
    ckptd_pb2_grpc.add_CkptServicer_to_server(servicer, server)
    add_agent_link(link, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, "ckpt.v1.AgentLink", reflection.SERVICE_NAME, health.SERVICE_NAME), server
    )
    if config.tls_cert:
        port = server.add_secure_port(config.listen, server_credentials(config))
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def start_daemon(config: DaemonConfig) -> Daemon:
    why = listen_refusal(config.listen, tls=bool(config.tls_cert), insecure=config.insecure)
    if why:
        raise ValueError(why)
    policy = access_policy(config)
    registry = Registry(config.state_dir)
    hub = AgentHub(registry, heartbeat_s=config.heartbeat_s, daemon_version=__version__)
    pusher = Pusher(registry, hub, config)
    metrics = Metrics(registry)
    pusher.on_done = metrics.push_done
    trigger = EngineTrigger(
        registry, keys=load_keys(config.engine_token_file), on_pause=metrics.engine_paused
    )
    tracer = JobTracer(config.otel_endpoint) if config.otel_endpoint else None

    def finished(job: Job) -> None:
        metrics.job_finished(job)
        if tracer is not None:
            tracer.job_finished(job)

    jobs = JobRunner(
        registry, hub, config, trigger=trigger.trigger, on_finished=finished, alive=trigger.alive,
        pushes=pusher.direct, deltas=pusher.deltas,
    )  # fmt: skip
    pusher.before_forget = jobs.push_failed
    pusher.part_sums = jobs.part_sums
    servicer = CkptServicer(registry, hub, pusher, jobs, trigger.verify)
    server, port = await _serve(config, policy, servicer, AgentLinkServicer(hub))
    daemon = Daemon(config, registry, hub, jobs, server, port, tracer=tracer)
    if config.metrics_listen:
        tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
        daemon.metrics_port = metrics.serve(config.metrics_listen, policy, tls)
    daemon._monitor = asyncio.create_task(hub.monitor())
    pusher.start_recovery()  # pushes a restart interrupted: complete or remove them
    daemon._reconciler = asyncio.create_task(jobs.restorer.reconcile_forever())
    log.info(
        "ckptd_started",
        listen=config.listen,
        port=port,
        state_dir=config.state_dir,
        version=__version__,
        metrics_port=daemon.metrics_port,
    )
    return daemon
