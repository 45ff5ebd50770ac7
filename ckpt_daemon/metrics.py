"""Prometheus metrics of ckptd: jobs, bytes and per-phase seconds (copy/H2D, broadcast,
engine reload, setup), agents and checkpoints. Served on --metrics-listen (off by default)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ckpt_daemon.model import Job
from ckpt_daemon.registry import Registry

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = CollectorRegistry()
        self.jobs = Counter(
            "ckptd_jobs", "Jobs finished, by kind and state", ["kind", "state"], registry=self.prom
        )
        self.job_seconds = Histogram(
            "ckptd_job_seconds",
            "Job run time (start to end)",
            ["kind"],
            buckets=_BUCKETS,
            registry=self.prom,
        )
        self.bytes = Counter(
            "ckptd_update_bytes", "Checkpoint bytes delivered by jobs", ["kind"], registry=self.prom
        )
        self.phase = Histogram(
            "ckptd_rank_phase_seconds",
            "Per-rank time in each phase of an update",
            ["phase"],
            buckets=_BUCKETS,
            registry=self.prom,
        )
        self.first_bucket = Histogram(
            "ckptd_first_bucket_seconds",
            "From the Update call to the first bucket delivered",
            buckets=_BUCKETS,
            registry=self.prom,
        )
        agents = Gauge("ckptd_agents_attached", "Attached agents", registry=self.prom)
        agents.set_function(lambda: registry.counts()[0])
        ready = Gauge(
            "ckptd_checkpoint_versions_ready", "READY checkpoint versions", registry=self.prom
        )
        ready.set_function(lambda: registry.counts()[1])

    def job_finished(self, job: Job) -> None:
        kind = job.kind.name.lower()
        self.jobs.labels(kind, job.state.name.lower()).inc()
        if job.started and job.finished:
            self.job_seconds.labels(kind).observe(job.finished - job.started)
        if job.state.name == "SUCCEEDED":
            self.bytes.labels(kind).inc(job.bytes_total)
            if job.first_bucket_s:
                self.first_bucket.observe(job.first_bucket_s)
        for r in job.results:
            for phase in ("copy_s", "broadcast_s", "reload_s", "setup_s", "total_s"):
                self.phase.labels(phase[:-2]).observe(getattr(r.times, phase))

    def serve(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.prom)
        return server.server_port
