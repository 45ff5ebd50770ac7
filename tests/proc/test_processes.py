"""Process-level properties: ckptd starts without torch; workers die with their agent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.cluster import Cluster, wait_for


def test_ckptd_ckptctl_and_the_client_import_no_torch() -> None:
    code = (
        "import sys, ckpt_daemon.main, ckpt_daemon.api.server, ckptctl.cli, ckpt_client.client, "
        "ckpt_client.direct_push, ckpt_client.probes; "
        "print('torch' in sys.modules, 'vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("pgrep not available")
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_workers_die_with_their_agent(tmp_path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_daemon()
        c.start_agent("solo", 2)
        c.wait_ranks(2)
        agent = c.procs["agent-solo"]
        workers = wait_for(lambda: [p for p in _children(agent.pid) if _alive(p)], 30, "workers")
        assert len(workers) >= 2
        os.kill(agent.pid, signal.SIGKILL)  # the agent alone, not its process group
        agent.wait(10)
        wait_for(lambda: not any(_alive(p) for p in workers), 20, "workers to exit")
        # ckptd notices the agent is gone
        wait_for(lambda: all(a.state != 1 for a in c.client.agents()), 20, "detached")
        time.sleep(0.1)
    finally:
        c.close()


def _sample(text: str, series: str) -> float:
    line = next((x for x in text.splitlines() if x.startswith(series + " ")), None)
    assert line is not None, f"{series} not in the scrape"
    return float(line.split()[-1])


@pytest.mark.slow
def test_prometheus_metrics(tmp_path) -> None:
    import urllib.error
    import urllib.request

    from safetensors.torch import save_file

    from demo.engines import free_port
    from tests.support.tensors import mixed_tensors

    port = free_port()
    c = Cluster(tmp_path)
    collector = OtlpCollector()
    try:
        c.start_daemon("--metrics-listen", f"127.0.0.1:{port}", "--otel-endpoint", collector.url)
        c.start_agent("m", 1)
        report = c.start_receiver("m", 0)
        c.wait_ranks(1)
        wait_for(report.exists, 60, "receiver")
        save_file(mixed_tensors(1, layers=1), str(tmp_path / "w.safetensors"))
        c.client.push("met", 1, [str(tmp_path / "w.safetensors")])
        job = c.client.wait(c.client.update("met", ranks=[0]).id, 60)
        assert job.state == 3, job.reason
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError, match="401"):  # a reader's token, or none
            urllib.request.urlopen(url, timeout=5)
        admin = {"Authorization": f"Bearer {c.token_file.read_text().strip()}"}
        req = urllib.request.Request(url, headers=admin)
        text = urllib.request.urlopen(req, timeout=5).read().decode()
        assert 'ckptd_jobs_total{kind="update",state="succeeded"} 1.0' in text
        assert 'ckptd_rank_phase_seconds_count{node="m",phase="broadcast"} 1.0' in text
        assert 'phase="total"' not in text  # the whole is its own metric
        assert 'ckptd_rank_update_seconds_count{node="m"} 1.0' in text
        assert "ckptd_agents_attached 1.0" in text
        assert 'ckptd_agent_heartbeat_age_seconds{node="m"}' in text
        assert 'ckptd_checkpoint_versions{state="ready"} 1.0' in text
        assert 'ckptd_host_store_bytes{node="m"}' in text
        assert 'ckptd_pushes_total{state="ready"} 1.0' in text
        assert "ckptd_push_seconds_count 1.0" in text
        assert f'ckptd_update_bytes_total{{kind="update"}} {float(job.bytes_total)}' in text
        assert "_created" not in text
        # achieved vs measured: the device's copy ceiling, the rank's rate and their ratio
        ceil = _sample(
            text, 'ckptd_device_ceiling_bytes_per_second{device="0",node="m",phase="copy"}'
        )
        assert 1e7 < ceil < 1e12, ceil
        agent = c.client.agents()[0]
        assert agent.devices[0].ceilings["copy"] == pytest.approx(ceil)
        assert 'ckptd_rank_phase_bytes_per_second_count{node="m",phase="copy"} 1.0' in text
        assert 'ckptd_rank_phase_bytes_per_second_count{node="m",phase="broadcast"} 1.0' in text
        # one rank owns every bucket: it staged all of them, and all passed its collective
        r0 = job.results[0]  # buckets: tensor bytes plus alignment
        assert r0.copy_bytes == r0.bytes and 0 <= r0.bytes - job.bytes_total < 4096, r0
        ratio = _sample(text, 'ckptd_rank_phase_ceiling_ratio{device="0",node="m",phase="copy"}')
        assert 0 < ratio < 100, ratio
        # traces (OTLP/HTTP): the job's span, and its rank's span under it
        spans = wait_for(lambda: collector.spans() or None, 20, "spans")
        jobs = [x for x in spans if x.name == "ckptd.job"]
        assert len(jobs) == 1, [x.name for x in spans]
        attrs = collector.attributes(jobs[0])
        assert attrs["ckpt.job.id"] == job.id and attrs["ckpt.state"] == "succeeded"
        assert attrs["ckpt.bytes"] == job.bytes_total
        ranks = [x for x in spans if x.name == "ckptd.rank"]
        assert [x.parent_span_id for x in ranks] == [jobs[0].span_id]
        assert collector.attributes(ranks[0])["ckpt.node"] == "m"
        assert jobs[0].end_time_unix_nano > jobs[0].start_time_unix_nano
    finally:
        c.close()
        collector.close()


class OtlpCollector:
    """A minimal OTLP/HTTP trace receiver on loopback (what an OpenTelemetry collector
    accepts): keeps every exported span."""

    def __init__(self) -> None:
        import http.server
        import threading

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        got = self._requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def spans(self) -> list:
        return [s for r in self._requests for rs in r.resource_spans
                for ss in rs.scope_spans for s in ss.spans]  # fmt: skip

    @staticmethod
    def attributes(span) -> dict:
        out = {}
        for kv in span.attributes:
            v = kv.value
            out[kv.key] = getattr(v, v.WhichOneof("value"))
        return out

    def close(self) -> None:
        self._server.shutdown()


@pytest.mark.slow
def test_failed_update_rolls_engines_back(tmp_path) -> None:
    """An engine that fails halfway through an update (some buckets loaded) is brought back
    to the version it served, from host memory, and the job says so."""
    from safetensors.torch import save_file

    from ckpt.v1 import types_pb2 as tpb
    from tests.support.cluster import read_report
    from tests.support.tensors import digests, mixed_tensors

    c = Cluster(tmp_path)
    try:
        c.start_daemon()
        c.start_agent("rb", 1)
        saved = dict(c.env)
        c.env["CKPT_FAULT"] = "fail:bad:2"  # the engine fails on bucket 2 of checkpoint "bad"
        report = c.start_receiver("rb", 0)
        c.env = saved
        c.wait_ranks(1)
        wait_for(report.exists, 60, "receiver")
        c.client.register_instance(
            tpb.Instance(
                name="R", kind=tpb.INSTANCE_RECEIVER, ranks=[tpb.InstanceRank(node_id="rb")]
            )
        )
        good, bad = mixed_tensors(1), mixed_tensors(2)
        save_file(good, str(tmp_path / "good.safetensors"))
        save_file(bad, str(tmp_path / "bad.safetensors"))
        c.client.push("good", 1, [str(tmp_path / "good.safetensors")])
        c.client.push("bad", 1, [str(tmp_path / "bad.safetensors")])
        job = c.client.wait(c.client.update("good", instances=["R"]).id, 60)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        job = c.client.wait(c.client.update("bad", instances=["R"], bucket_bytes=16384).id, 60)
        assert job.state == tpb.JOB_FAILED
        # the failed job ends only once R is back on one version, and says so
        assert "injected failure" in job.reason and "R restored to good@1" in job.reason
        rollback = job.reason.split("(job ")[1].split(")")[0]
        assert c.client.job(rollback).state == tpb.JOB_SUCCEEDED
        rep = read_report(report)
        assert rep["checkpoint"] == "good" and rep["version"] == 1
        assert {k: rep["tensors"][k] for k in good} == digests(good)
        inst = {i.name: i for i in c.client.instances()}["R"]
        assert inst.checkpoint == "good" and inst.version == 1 and inst.ready
    finally:
        c.close()
