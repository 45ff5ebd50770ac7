"""Prometheus metrics of ckptd, served on --metrics-listen (off by default). Names and labels
follow Prometheus conventions (base units, `_total` counters, no `_created` series).

Events: jobs by kind and outcome, their seconds and bytes; each rank's seconds per phase
(copy/H2D, broadcast, engine reload, set-up; `ckptd_rank_update_seconds` the whole) by node;
the time from Update to the first bucket; rollbacks (restore jobs) by outcome; how long each
engine was paused for an update (what its users see); pushes by outcome, seconds and bytes.
State, read at scrape: agents attached, each agent's heartbeat age, host-store bytes per
node, checkpoint versions by state, instances ready, each device's measured ceilings (bytes/s
per phase). Rates: each rank's achieved rate per phase whose bytes are known (copy, broadcast), and
its last copy rate over its device's ceiling."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ckpt_daemon.model import CheckpointVersion, Job, RankResult
from ckpt_daemon.observe import metrics_http
from ckpt_daemon.registry.store import Registry
from ckpt_daemon.security.auth import AccessPolicy

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300)
_RATES = tuple(g * 1e9 for g in (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 50, 100, 200, 500))
PHASES = ("copy", "broadcast", "reload", "setup")

try:  # no `_created` series next to every counter and histogram
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
except ImportError:  # older prometheus_client
    pass


class _State(Collector):
    """Gauges read from the registry at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self._r = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        v, now = self._r.view, time.time()  # the thread's frozen picture (registry/view.py)
        attached = GaugeMetricFamily("ckptd_agents_attached", "Agents attached now")
        attached.add_metric([], v.attached)
        age = GaugeMetricFamily(
            "ckptd_agent_heartbeat_age_seconds", "Since an agent was last heard", labels=["node"]
        )
        for a in v.agents:
            if a.attached:
                age.add_metric([a.node_id], max(0.0, now - a.last_seen))
        store = GaugeMetricFamily(
            "ckptd_host_store_bytes", "Checkpoint bytes held in host stores", labels=["node"]
        )
        for node, n in v.store_bytes:
            store.add_metric([node], n)
        versions = GaugeMetricFamily(
            "ckptd_checkpoint_versions", "Checkpoint versions by state", labels=["state"]
        )
        for state, n in v.versions:
            versions.add_metric([state], n)
        ceiling = GaugeMetricFamily(
            "ckptd_device_ceiling_bytes_per_second",
            "What a device's worker measured at start, per update phase",
            labels=["node", "device", "phase"],
        )
        for a in v.agents:
            for index, rates in a.ceilings:
                for phase, rate in rates:
                    ceiling.add_metric([a.node_id, str(index), phase], rate)
        yield ceiling
        ready = GaugeMetricFamily("ckptd_instances", "Registered instances", labels=["ready"])
        ready.add_metric(["true"], v.instances_ready)
        ready.add_metric(["false"], v.instances_not_ready)
        yield from (attached, age, store, versions, ready)


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.prom = p = CollectorRegistry()
        self.jobs = Counter("ckptd_jobs", "Jobs ended", ["kind", "state"], registry=p)
        self.job_seconds = Histogram(
            "ckptd_job_seconds", "Job run time, start to end", ["kind"], buckets=_BUCKETS,
            registry=p,
        )  # fmt: skip
        self.bytes = Counter(
            "ckptd_update_bytes", "Checkpoint bytes of succeeded jobs", ["kind"], registry=p
        )
        self.phase = Histogram(
            "ckptd_rank_phase_seconds", "A rank's time in one phase of an update",
            ["phase", "node"], buckets=_BUCKETS, registry=p,
        )  # fmt: skip
        self.rank_total = Histogram(
            "ckptd_rank_update_seconds", "A rank's whole update", ["node"], buckets=_BUCKETS,
            registry=p,
        )  # fmt: skip
        self.first_bucket = Histogram(
            "ckptd_first_bucket_seconds", "From the Update call to the first bucket delivered",
            buckets=_BUCKETS, registry=p,
        )  # fmt: skip
        self.rollbacks = Counter(
            "ckptd_rollbacks", "Restore jobs run after a failed update", ["state"], registry=p
        )
        self.pause = Histogram(
            "ckptd_engine_pause_seconds", "How long an engine was paused for an update",
            ["instance"], buckets=_BUCKETS, registry=p,
        )  # fmt: skip
        self.achieved = Histogram(
            "ckptd_rank_phase_bytes_per_second", "A rank's achieved rate in one phase",
            ["phase", "node"], buckets=_RATES, registry=p,
        )  # fmt: skip
        self.of_ceiling = Gauge(
            "ckptd_rank_phase_ceiling_ratio",
            "A rank's achieved rate in its last update over its device's measured ceiling",
            ["phase", "node", "device"], registry=p,
        )  # fmt: skip
        self._registry = registry
        self.pushes = Counter("ckptd_pushes", "Pushes ended", ["state"], registry=p)
        self.push_seconds = Histogram(
            "ckptd_push_seconds", "A push, accepted to ready", buckets=_BUCKETS, registry=p
        )
        self.push_bytes = Counter("ckptd_push_bytes", "Bytes of ready pushes", registry=p)
        p.register(_State(registry))

    def job_finished(self, job: Job) -> None:
        kind, state = job.kind.name.lower(), job.state.name.lower()
        self.jobs.labels(kind, state).inc()
        if job.spec.rollback_of:
            self.rollbacks.labels(state).inc()
        if job.started and job.finished:
            self.job_seconds.labels(kind).observe(job.finished - job.started)
        if job.state.name == "SUCCEEDED":
            self.bytes.labels(kind).inc(job.bytes_total)
            if job.first_bucket_s:
                self.first_bucket.observe(job.first_bucket_s)
        for r in job.results:
            node = r.owner.node_id
            for phase in PHASES:
                self.phase.labels(phase, node).observe(getattr(r.times, f"{phase}_s"))
            self.rank_total.labels(node).observe(r.times.total_s)
            self._rates(r)

    def _rates(self, r: RankResult) -> None:
        """Phases whose bytes are known: copy (what the rank staged from host stores) against
        its device's ceiling; broadcast (what passed through its collective)."""
        if not r.ok:
            return
        node = r.owner.node_id
        if r.bytes > 0 and r.times.broadcast_s > 0:
            self.achieved.labels("broadcast", node).observe(r.bytes / r.times.broadcast_s)
        if r.copy_bytes <= 0 or r.times.copy_s <= 0:
            return
        rate = r.copy_bytes / r.times.copy_s
        self.achieved.labels("copy", node).observe(rate)
        ceiling = self._registry.ceiling(r.owner, "copy")
        if ceiling:
            self.of_ceiling.labels("copy", node, str(r.owner.device)).set(rate / ceiling)

    def engine_paused(self, instance: str, seconds: float) -> None:
        self.pause.labels(instance).observe(seconds)

    def push_done(self, cv: CheckpointVersion, ok: bool) -> None:
        self.pushes.labels("ready" if ok else "failed").inc()
        if ok:
            self.push_seconds.observe(max(0.0, time.time() - cv.created))
            self.push_bytes.inc(sum(t.nbytes for t in cv.tensors))

    def serve(self, listen: str, policy: AccessPolicy, tls: tuple[str, str] | None = None) -> int:
        """Serves /metrics (ckpt_daemon.observe.metrics_http: a reader's token, ckptd's TLS)."""
        server = metrics_http.serve(listen, self.prom, policy, tls=tls)
        return server.server_port
