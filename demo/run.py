"""`make demo`: a real vLLM engine serves weights pushed through ckptd, live.

Builds a tiny Llama locally (two random versions), a development CA and role tokens, starts
ckptd (TLS, tokens), one agent (its own node-bound token) and a vLLM OpenAI server behind
the guard (its instance's own key), pushes both versions, and updates the running engine
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
from ckpt_client.client import Client
from ckpt_client.probes import greedy_probe
from ckpt_common.credentials import Credentials
from ckpt_common.errors import PermissionDenied
from ckpt_daemon.engines.keys import write_key
from ckpt_daemon.security.certs import add_token, make_certs
from demo.engines import complete, free_port, healthy, vllm_command, vllm_env
from demo.models import PROMPTS, build_model, hf_greedy, save_model

ROOT = Path(os.environ.get("CKPT_DEMO_DIR", ".demo")).resolve()
N = 8
ROLES = {  # token name -> roles (ckpt_daemon.security.auth)
    "trainer": "trainer,reader",
    "operator": "operator,reader",
    "autoscaler": "autoscaler,reader",
}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Procs:
    """The demo's processes: logs under ROOT/logs, stopped as whole groups at the end."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen] = []

    def spawn(self, name: str, cmd: list[str], env: dict) -> None:
        log = open(ROOT / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.all.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        )

    def wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.all:
                if p.poll() is not None:
                    raise SystemExit(f"demo: {p.args[2]} exited early; see {ROOT}/logs")
            if pred():
                return
            time.sleep(0.3)
        raise SystemExit(f"demo: timed out waiting for {what}; see {ROOT}/logs")

    def stop(self) -> None:
        for p in reversed(self.all):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.all:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def make_credentials() -> Path:
    """A dev CA and server certificate, role tokens, the agent's token, the engines' master
    and the key of the demo's instance (vllm-demo)."""
    sec = ROOT / "secrets"
    make_certs(sec, [], [], [])
    for name, roles in ROLES.items():  # acting as this user: agents read what it may
        add_token(
            sec / "auth.json", name, roles.split(","), "", sec / f"{name}.token", uid=os.getuid()
        )
    add_token(sec / "auth.json", "agent-demo", ["agent"], "demo", sec / "agent.token")
    fd = os.open(sec / "engine.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(16).hex())
    write_key(str(sec / "engine.token"), "vllm-demo", str(sec / "vllm-demo.key"))
    return sec


def client(addr: str, sec: Path, role: str) -> Client:
    creds = Credentials(tls_ca=str(sec / "ca.pem"), token_file=str(sec / f"{role}.token"))
    return Client(addr, credentials=creds)


def start_fleet(procs: Procs, sec: Path, v1: Path, env: dict) -> tuple[str, str]:
    """ckptd (TLS + tokens), the agent, a guarded vLLM; returns (ckptd addr, vLLM url)."""
    port_file = ROOT / "ckptd.port"
    tls = ["--tls-cert", str(sec / "server.pem"), "--tls-key", str(sec / "server.key")]
    procs.spawn(
        "ckptd",
        [sys.executable, "-m", "ckpt_daemon.main", "--listen", "127.0.0.1:0", "--state-dir",
         str(ROOT / "state"), "--port-file", str(port_file), *tls, "--auth-file",
         str(sec / "auth.json"), "--engine-token-file", str(sec / "engine.token")],
        env,
    )  # fmt: skip
    procs.wait(port_file.exists, 60, "ckptd")
    addr = f"127.0.0.1:{port_file.read_text()}"
    agent_env = {**env, "CKPTD_TLS_CA": str(sec / "ca.pem"),
                 "CKPTD_TOKEN_FILE": str(sec / "agent.token"),
                 "CKPT_SOURCE_ROOTS": f"{ROOT}:/dev/shm"}  # fmt: skip
    procs.spawn(
        "agent",
        [sys.executable, "-m", "ckpt_agent.main", "--daemon", addr, "--node-id", "demo",
         "--slots", "1"],
        agent_env,
    )  # fmt: skip
    vport = free_port()
    url = f"http://127.0.0.1:{vport}"
    engine_env = vllm_env(env, extra={"CKPT_ENGINE_TOKEN_FILE": str(sec / "vllm-demo.key")})
    procs.spawn("vllm", vllm_command(str(v1), vport), engine_env)
    with client(addr, sec, "operator") as c:
        procs.wait(lambda: any(a.state == tpb.AGENT_ATTACHED for a in c.agents()), 120, "the agent")
    procs.wait(lambda: healthy(url), 300, "vLLM")
    return addr, url


def update(ops: Client, version: int) -> tpb.Job:
    return ops.wait(ops.update("llama", version, instances=["vllm-demo"]).id, 120)


def live_updates(ops: Client, url: str, prompt: list[int], predicted: dict) -> bool:
    ok = True
    for version in (2, 1):
        say(f"live update to llama@{version} (operator token)")
        t0 = time.monotonic()
        job = update(ops, version)
        state = tpb.JobState.Name(job.state)
        print(
            f"  job {job.id}: {state} in {time.monotonic() - t0:.2f}s ({job.buckets_total} buckets)"
        )
        if job.state != tpb.JOB_SUCCEEDED:
            print(f"  reason: {job.reason}")
            return False
        got = complete(url, prompt, N)
        same = got == predicted[version]
        print(
            f"  vLLM now says {got}  {f'== transformers v{version}' if same else '!= transformers'}"
        )
        ok &= same
    return ok


def refused_bad_version(
    trainer: Client, ops: Client, url: str, v2: Path, probe: tpb.Probe, want: list[int]
) -> bool:
    """llama@3: v2's bytes under v1's probe. The engine loads it, misses the probe while
    still paused, and ckptd takes it back to v1 before it serves anything."""
    say("llama@3: v2's bytes pushed with v1's probe (a mislabelled version)")
    trainer.push("llama", 3, [str(v2)], probe=probe)
    job = update(ops, 3)
    print(f"  job {job.id}: {tpb.JobState.Name(job.state)}: {job.reason}")
    deadline = time.monotonic() + 60
    inst = None
    while time.monotonic() < deadline:
        inst = {i.name: i for i in ops.instances()}["vllm-demo"]
        if inst.ready and inst.version == 1:
            break
        time.sleep(0.5)
    got = complete(url, PROMPTS[0], N)
    same = got == want
    print(
        f"  restored: vllm-demo ready={inst.ready} on llama@{inst.version}; vLLM says {got}  "
        + ("== transformers v1" if same else "!= transformers")
    )
    return job.state == tpb.JOB_FAILED and inst.ready and inst.version == 1 and same


def run(procs: Procs) -> bool:
    say("building a tiny Llama locally: two random versions (no downloads)")
    v1 = save_model("llama", 0, ROOT / "llama-v1")
    v2 = save_model("llama", 1, ROOT / "llama-v2")
    prompt = PROMPTS[0]
    predicted = {1: hf_greedy(v1, [prompt], N)[0], 2: hf_greedy(v2, [prompt], N)[0]}
    print(
        f"transformers predicts for prompt {prompt}:\n"
        f"  v1 -> {predicted[1]}\n  v2 -> {predicted[2]}"
    )
    say("a development CA, role tokens (trainer, operator, autoscaler) and the agent's token")
    sec = make_credentials()
    say("starting ckptd (TLS, tokens), one agent (node demo) and a guarded vLLM server")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CKPT_IPC_DIR": str(ROOT / "ipc")}
    addr, url = start_fleet(procs, sec, v1, env)
    print(f"ckptd at {addr} (TLS), vLLM at {url}")
    trainer, ops = client(addr, sec, "trainer"), client(addr, sec, "operator")
    with client(addr, sec, "autoscaler") as scaler:
        scaler.register_instance(
            tpb.Instance(name="vllm-demo", kind=tpb.INSTANCE_VLLM, endpoint=url,
                         ranks=[tpb.InstanceRank(node_id="demo", device=0)])
        )  # fmt: skip
    say("pushing both versions into the agent's host memory, each with its probe (trainer)")
    probes = {s + 1: greedy_probe(build_model("llama", s), PROMPTS[1], N) for s in (0, 1)}
    for version, d in ((1, v1), (2, v2)):
        t0 = time.monotonic()
        cp = trainer.push("llama", version, [str(d)], probe=probes[version])
        print(
            f"  llama@{version}: {cp.tensor_count} tensors, {cp.total_bytes} bytes, "
            f"{time.monotonic() - t0:.2f}s"
        )
    try:
        trainer.update("llama", 2, instances=["vllm-demo"])
        print("  the trainer token could update: roles are NOT enforced")
        return False
    except PermissionDenied as e:
        print(f"  the trainer token may not update: {e.message}")
    got = complete(url, prompt, N)
    ok = got == predicted[1]
    print(f"vLLM serves v1 now: {got}  {'== transformers v1' if ok else '!='}")
    ok &= live_updates(ops, url, prompt, predicted)
    ok &= refused_bad_version(trainer, ops, url, v2, probes[1], predicted[1])
    say("fleet state (ckptctl get instances -o wide, operator token over TLS)")
    r = subprocess.run(
        [sys.executable, "-m", "ckptctl.cli", "get", "instances", "-o", "wide", "--addr", addr,
         "--tls-ca", str(sec / "ca.pem"), "--token-file", str(sec / "operator.token")],
        check=False,
    )  # fmt: skip
    ok &= r.returncode == 0
    trainer.close()
    ops.close()
    return ok


def main() -> int:
    shutil.rmtree(ROOT, ignore_errors=True)
    (ROOT / "logs").mkdir(parents=True)
    procs = Procs()
    try:
        ok = run(procs)
    finally:
        procs.stop()
    say("demo " + ("passed: every completion matched transformers" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
