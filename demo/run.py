"""`make demo`: a real vLLM engine serves weights pushed through ckptd, live.

Builds a tiny Llama locally (two random versions), starts ckptd, one agent and a vLLM
OpenAI server with the extension, pushes both versions, and updates the running engine
v1 -> v2 -> v1, showing a completion each time next to what transformers predicts on the
same weights. Each version carries a probe (transformers' greedy tokens on its weights) that
the engine must answer before it serves it; a version whose probe does not match its bytes
is refused and the engine goes back to v1. Everything runs on loopback under .demo/ and is
shut down at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ckpt.v1 import types_pb2 as tpb
from ckptctl.client import Client
from ckptctl.probes import greedy_probe
from demo.engines import complete, free_port, healthy, vllm_command, vllm_env
from demo.models import PROMPTS, build_model, hf_greedy, save_model

ROOT = Path(os.environ.get("CKPT_DEMO_DIR", ".demo")).resolve()
N = 8


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait(pred, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"demo: {p.args[2]} exited early; see {ROOT}/logs")
        if pred():
            return
        time.sleep(0.3)
    raise SystemExit(f"demo: timed out waiting for {what}; see {ROOT}/logs")


def refused_bad_version(
    client: Client, url: str, v2: Path, probe: tpb.Probe, want: list[int], prompt: list[int]
) -> bool:
    """llama@3: v2's bytes under v1's probe. The engine loads it, misses the probe while
    still paused, and ckptd takes it back to v1 before it serves anything."""
    say("llama@3: v2's bytes pushed with v1's probe (a mislabelled version)")
    client.push("llama", 3, [str(v2)], probe=probe)
    job = client.wait(client.update("llama", 3, instances=["vllm-demo"]).id, 120)
    print(f"  job {job.id}: {tpb.JobState.Name(job.state)}: {job.reason}")
    deadline = time.monotonic() + 60
    inst = None
    while time.monotonic() < deadline:
        inst = {i.name: i for i in client.instances()}["vllm-demo"]
        if inst.ready and inst.version == 1:
            break
        time.sleep(0.5)
    got = complete(url, prompt, N)
    print(
        f"  restored: vllm-demo ready={inst.ready} on llama@{inst.version}; vLLM says {got}  "
        + ("== transformers v1" if got == want else "!= transformers")
    )
    return job.state == tpb.JOB_FAILED and inst.ready and inst.version == 1 and got == want


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    (ROOT / "logs").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CKPT_IPC_DIR": str(ROOT / "ipc")}
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str], penv: dict) -> subprocess.Popen:
        log = open(ROOT / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=penv, start_new_session=True
        )
        procs.append(p)
        return p

    try:
        say("building a tiny Llama locally: two random versions (no downloads)")
        v1 = save_model("llama", 0, ROOT / "llama-v1")
        v2 = save_model("llama", 1, ROOT / "llama-v2")
        prompt = PROMPTS[0]
        predicted = {1: hf_greedy(v1, [prompt], N)[0], 2: hf_greedy(v2, [prompt], N)[0]}
        print(
            f"transformers predicts for prompt {prompt}:\n  v1 -> {predicted[1]}\n"
            f"  v2 -> {predicted[2]}"
        )

        say("starting ckptd, one agent (node demo, 1 device) and a vLLM server")
        port_file = ROOT / "ckptd.port"
        spawn(
            "ckptd",
            [
                sys.executable,
                "-m",
                "ckpt_daemon.main",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(ROOT / "state"),
                "--port-file",
                str(port_file),
            ],
            env,
        )
        wait(port_file.exists, 60, "ckptd", procs)
        addr = f"127.0.0.1:{port_file.read_text()}"
        spawn(
            "agent",
            [
                sys.executable,
                "-m",
                "ckpt_agent.main",
                "--daemon",
                addr,
                "--node-id",
                "demo",
                "--slots",
                "1",
            ],
            env,
        )
        vport = free_port()
        url = f"http://127.0.0.1:{vport}"
        spawn("vllm", vllm_command(str(v1), vport), vllm_env(env))
        client = Client(addr)
        wait(
            lambda: any(a.state == tpb.AGENT_ATTACHED for a in client.agents()),
            120,
            "the agent",
            procs,
        )
        wait(lambda: healthy(url), 300, "vLLM", procs)
        print(f"ckptd at {addr}, vLLM at {url}")
        client.register_instance(
            tpb.Instance(
                name="vllm-demo",
                kind=tpb.INSTANCE_VLLM,
                endpoint=url,
                ranks=[tpb.InstanceRank(node_id="demo", device=0)],
            )
        )

        say("pushing both versions into the agent's host memory, each with its probe")
        probes = {s + 1: greedy_probe(build_model("llama", s), PROMPTS[1], N) for s in (0, 1)}
        for version, d in ((1, v1), (2, v2)):
            t0 = time.monotonic()
            cp = client.push("llama", version, [str(d)], probe=probes[version])
            print(
                f"  llama@{version}: {cp.tensor_count} tensors, {cp.total_bytes} bytes, "
                f"{time.monotonic() - t0:.2f}s"
            )

        ok = True
        got = complete(url, prompt, N)
        print(f"vLLM serves v1 now: {got}  {'== transformers v1' if got == predicted[1] else '!='}")
        ok &= got == predicted[1]
        for version in (2, 1):
            say(f"live update to llama@{version}")
            t0 = time.monotonic()
            job = client.wait(client.update("llama", version, instances=["vllm-demo"]).id, 120)
            took = time.monotonic() - t0
            state = tpb.JobState.Name(job.state)
            print(f"  job {job.id}: {state} in {took:.2f}s ({job.buckets_total} buckets)")
            if job.state != tpb.JOB_SUCCEEDED:
                print(f"  reason: {job.reason}")
                return 1
            got = complete(url, prompt, N)
            same = got == predicted[version]
            verdict = f"== transformers v{version}" if same else "!= transformers"
            print(f"  vLLM now says {got}  {verdict}")
            ok &= same
        ok &= refused_bad_version(client, url, v2, probes[1], predicted[1], prompt)
        say("fleet state (ckptctl instances)")
        subprocess.run(
            [sys.executable, "-m", "ckptctl.cli", "--addr", addr, "instances"], check=False
        )
        client.close()
        say("demo " + ("passed: every completion matched transformers" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
