"""OpenTelemetry spans of ckptd's jobs, off by default (`--otel-endpoint`, env
CKPTD_OTEL_ENDPOINT): OTLP over HTTP/protobuf to a collector, e.g.
http://127.0.0.1:4318/v1/traces (plain http only to loopback; https anywhere; headers and
CA as the exporter reads them: OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_CERTIFICATE).

One span per job (`ckptd.job`: created to finished; id, kind, checkpoint, version, method,
ranks, bytes, state, reason), and under it one per rank (`ckptd.rank`: its update from the
job's start; node, device, ok, bytes, reason, seconds per phase). Spans are written once the
job ends, from its recorded times: nothing is exported for a job still running."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import structlog

from ckpt_common.credentials import is_loopback_host
from ckpt_daemon.model import Job, JobState, RankResult
from ckpt_daemon.observe.metrics import PHASES

log = structlog.get_logger("ckptd")
EXPORT_TIMEOUT_S = 5.0


def check_endpoint(url: str) -> None:
    """An OTLP/HTTP URL: https, or http to loopback (traces name checkpoints and reasons)."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--otel-endpoint {url!r}: want http(s)://host:port/v1/traces")
    if u.scheme == "http" and not is_loopback_host(u.hostname):
        raise ValueError(f"--otel-endpoint {url!r}: plain http only to loopback; use https")


def _ns(unix_s: float) -> int:
    return int(unix_s * 1e9)


def _rank_attributes(r: RankResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ckpt.rank": r.rank, "ckpt.node": r.owner.node_id, "ckpt.device": r.owner.device,
        "ckpt.ok": r.ok, "ckpt.bytes": r.bytes, "ckpt.reason": r.reason,
    }  # fmt: skip
    for phase in PHASES:
        out[f"ckpt.{phase}_s"] = getattr(r.times, f"{phase}_s")
    return out


class JobTracer:
    def __init__(self, endpoint: str, service: str = "ckptd") -> None:
        check_endpoint(endpoint)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise ValueError(
                "--otel-endpoint needs opentelemetry-sdk and "
                "opentelemetry-exporter-otlp-proto-http (pip install 'ckptd[otel]')"
            ) from e
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
        self._tracer = self._provider.get_tracer("ckptd")
        log.info("tracing_on", endpoint=endpoint)

    def job_finished(self, job: Job) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        start = job.started or job.created
        end = job.finished or time.time()
        span = self._tracer.start_span(
            "ckptd.job",
            start_time=_ns(job.created or start),
            attributes={
                "ckpt.job.id": job.id,
                "ckpt.job.kind": job.kind.name.lower(),
                "ckpt.checkpoint": job.spec.checkpoint,
                "ckpt.version": job.version,
                "ckpt.method": job.spec.method,
                "ckpt.ranks": len(job.target_ranks),
                "ckpt.bytes": job.bytes_total,
                "ckpt.state": job.state.name.lower(),
                "ckpt.reason": job.reason,
                "ckpt.rollback_of": job.spec.rollback_of,
            },  # fmt: skip
        )
        ctx = trace.set_span_in_context(span)
        for r in job.results:
            rank = self._tracer.start_span(
                "ckptd.rank", context=ctx, start_time=_ns(start), attributes=_rank_attributes(r)
            )
            if not r.ok:
                rank.set_status(Status(StatusCode.ERROR, r.reason))
            rank.end(end_time=_ns(start + max(0.0, r.times.total_s)))
        if job.state != JobState.SUCCEEDED:
            span.set_status(Status(StatusCode.ERROR, job.reason))
        span.end(end_time=_ns(end))

    def close(self) -> None:
        """Exports what is queued (bounded by the exporter's timeout)."""
        self._provider.shutdown()
