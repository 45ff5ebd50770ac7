"""Real processes on loopback for integration tests: ckptd on port 0, agents, receivers."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.config import TRUSTED_FABRIC_ENV
from ckpt_client.client import Client
from ckpt_common.credentials import ADMIN_TOKEN_FILE, TOKEN_FILE_ENV, Credentials
from ckpt_common.engine_auth import instance_key
from ckpt_common.sources import SOURCE_ROOTS_ENV
from tests.support.spec import ClusterSpec

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]
FAULTS_DIR = Path(__file__).resolve().parent / "faults"  # its sitecustomize: CKPT_FAULT


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Latency:
    """Calls `call` every 20 ms on a thread while the block runs; `worst` is the slowest
    answer in seconds (how long the server it asks stalled)."""

    def __init__(self, call) -> None:
        import threading

        self.worst = 0.0
        self._call = call
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._call()
            self.worst = max(self.worst, time.monotonic() - t0)
            time.sleep(0.02)

    def __enter__(self) -> Latency:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


class Cluster:
    """Processes of one test cluster under `root` (logs, state, reports). `start(spec, root)`
    makes one from a ClusterSpec; a test may start, stop and restart its processes."""

    def __init__(self, root: Path, spec: ClusterSpec | None = None) -> None:
        self.root = root
        self.spec = spec or ClusterSpec()
        self.reports: list[Path] = []  # the spec's receivers' report files, in its order
        self._clients: dict[str, Client] = {}
        self.state_dir = root / "state"
        self.token_file = self.state_dir / ADMIN_TOKEN_FILE
        self.engine_token_file = root / "engine.token"
        self.ipc_dir = root / "ipc"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.engine_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.client: Client | None = None
        self.nodes: set[str] = set()
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CKPT_IPC_DIR": str(self.ipc_dir),
            "CKPT_LOG_LEVEL": os.environ.get("CKPT_LOG_LEVEL", "info"),
            # ckptd's local admin token (it writes it at start): agents, ckptctl, SDK use it
            TOKEN_FILE_ENV: str(self.token_file),
            # P2P tests: loopback between agents on this machine is the fabric they trust
            TRUSTED_FABRIC_ENV: "1",
            # agents read push sources only under these (pytest's tmp dirs, push staging)
            SOURCE_ROOTS_ENV: f"{tempfile.gettempdir()}:/dev/shm",
            # fault injection (CKPT_FAULT) lives in tests: faults/sitecustomize.py
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")) if p
            ),
        }

    def engine_key(self, instance: str) -> bytes:
        """The key of one instance, from ckptd's master (--engine-token-file)."""
        return instance_key(self.engine_token_file.read_text().strip().encode(), instance)

    def engine_key_file(self, instance: str) -> Path:
        """A file (0600) with the key of one instance: its engine's CKPT_ENGINE_TOKEN_FILE."""
        path = self.root / f"engine-{instance}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.engine_key(instance) + b"\n")
        return path

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token_file_of(self, name: str) -> Path:
        """The file of the spec's auth token `name`."""
        return self.root / f"{name}.token"

    def client_as(self, name: str) -> Client:
        """A client presenting the spec's auth token `name` (closed with the cluster)."""
        if name not in self._clients:
            creds = Credentials(token_file=str(self.token_file_of(name)))
            self._clients[name] = Client(self.addr, credentials=creds)
        return self._clients[name]

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        p = subprocess.Popen(
            [PY, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )
        self.procs[name] = p
        return p

    def start_daemon(self, *extra: str) -> None:
        port_file = self.root / "ckptd.port"
        if port_file.exists():
            port_file.unlink()
        listen = f"127.0.0.1:{self.port}" if self.port else "127.0.0.1:0"
        self._spawn(
            "ckptd",
            [
                "-m",
                "ckpt_daemon.main",
                "--listen",
                listen,
                "--state-dir",
                str(self.state_dir),
                "--port-file",
                str(port_file),
                "--heartbeat-s",
                "0.5",
                "--engine-token-file",
                str(self.engine_token_file),
                *extra,
            ],
        )
        wait_for(port_file.exists, 30, "ckptd to listen")
        self.port = int(port_file.read_text())
        if self.spec.auth:  # its clients outlive a restart: ckptd comes back on the same port
            self.client = self.client_as(self.spec.auth.client)
            return
        if self.client and self.client not in self._clients.values():
            self.client.close()
        token = str(self.token_file) if self.token_file.exists() else ""  # no: an --auth-file
        self.client = Client(self.addr, credentials=Credentials(token_file=token))

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stops a process and its whole process group (vLLM's workers, agent workers)."""
        p = self.procs.pop(name, None)
        if p is None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def start_agent(
        self, node_id: str, slots: int = 1, *extra: str, env: dict | None = None
    ) -> None:
        self.nodes.add(node_id)
        self._spawn(
            f"agent-{node_id}",
            [
                "-m",
                "ckpt_agent.main",
                "--daemon",
                self.addr,
                "--node-id",
                node_id,
                "--slots",
                str(slots),
                "--heartbeat-s",
                "0.5",
                *extra,
            ],
            env,
        )

    def report(self, node_id: str, device: int) -> Path:
        """The report file of the reference receiver on node_id's device."""
        return self.root / f"report-{node_id}-{device}.json"

    def start_receiver(
        self, node_id: str, device: int, *extra: str, env: dict | None = None
    ) -> Path:
        report = self.report(node_id, device)
        self._spawn(
            f"recv-{node_id}-{device}",
            [
                "-m",
                "vllm_ext.reference",
                "--node-id",
                node_id,
                "--device",
                str(device),
                "--report",
                str(report),
                *extra,
            ],
            env,
        )
        return report

    def receiver_instance(self, name: str, node_id: str, devices: list[int]) -> list[Path]:
        """Reference receivers on devices of node_id, registered as one instance (TP =
        len(devices)) once they listen. Returns their report files."""
        reports = [self.start_receiver(node_id, d) for d in devices]
        for r in reports:
            wait_for(r.exists, 60, "receivers to start")
        self.register_receivers(name, node_id, devices)
        return reports

    def register_receivers(self, name: str, node_id: str, devices: list[int] | tuple) -> None:
        """Registers reference receivers on devices of node_id as one instance."""
        assert self.client
        self.client.register_instance(
            tpb.Instance(
                name=name,
                kind=tpb.INSTANCE_RECEIVER,
                tp_size=len(devices),
                ranks=[tpb.InstanceRank(node_id=node_id, device=d) for d in devices],
            )
        )

    def corrupt_store(self, name: str, version: int, data: bytes) -> None:
        """Flips a byte in the middle of `data` where an owner's host store of name@version
        holds it (what a writer with access to the store could do after the push)."""
        from ckpt_agent import shm
        from ckpt_agent.host_store import device_prefix, store_segment

        assert self.client
        for s in self.client.get(name, version).shards:
            seg = store_segment(device_prefix(s.node_id, s.device), name, version)
            if not os.path.exists(os.path.join(shm.SHM_DIR, seg)):
                continue
            mem = shm.attach(seg)
            try:
                at = bytes(mem.buf).find(data)
                if at >= 0:
                    mem.buf[at + len(data) // 2] ^= 0x5A
                    return
            finally:
                mem.close()
        raise AssertionError(f"no store of {name}@{version} holds those bytes")

    def wait_ranks(self, n: int, timeout: float = 60) -> None:
        assert self.client
        wait_for(
            lambda: sum(len(a.devices) for a in self.client.agents() if a.state == 1) >= n,
            timeout,
            f"{n} ranks attached",
        )

    def close(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name, timeout=5)
            except Exception:  # keep stopping the others
                pass
        # Segments of agents killed by a test outlive them: free them.
        from ckpt_agent import shm
        from ckpt_agent.host_store import segment_prefix

        for node in self.nodes:
            shm.remove_prefix(segment_prefix(node))
        if self.client and self.client not in self._clients.values():
            self.client.close()
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start(spec: ClusterSpec, root: Path) -> Cluster:
    """A cluster as `spec` says, ready: ckptd listening, every node's devices attached, every
    receiver listening and registered in its instance. Closed again if any of it fails."""
    c = Cluster(root, spec)
    try:
        c.env.update(spec.env)
        if spec.auth:
            from ckpt_daemon.security.certs import add_token

            auth_file = root / "auth.json"
            for t in spec.auth.tokens:
                add_token(
                    auth_file, t.name, list(t.roles), t.node, c.token_file_of(t.name), uid=t.uid
                )
            c.env[TOKEN_FILE_ENV] = str(c.token_file_of(spec.auth.agent))
            c.start_daemon("--auth-file", str(auth_file), *spec.daemon_flags())
        else:
            c.start_daemon(*spec.daemon_flags())
        for n in spec.nodes:
            c.start_agent(n.id, n.devices, *n.args, env=dict(n.env))
        for r in spec.receivers:
            for d in r.devices:
                c.reports.append(c.start_receiver(r.node, d, *r.args_for(d), env=r.env_for(d)))
        if spec.nodes:
            c.wait_ranks(spec.ranks, spec.start_timeout_s)
        for rep in c.reports:
            wait_for(rep.exists, spec.start_timeout_s, "receivers to start")
        for r in spec.receivers:
            if r.instance:
                c.register_receivers(r.instance, r.node, r.devices)
    except BaseException:
        c.close()
        raise
    return c


def read_report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def reports_hold(reports: list[Path], digests: dict[str, str], wait_s: float = 10.0) -> bool:
    """Whether every reference receiver's report shows these tensor digests (waiting up to
    wait_s: a receiver writes its report just after it tells its worker it is done, so a job
    can succeed a moment before)."""

    def now() -> bool:
        for rep in reports:
            got = read_report(rep).get("tensors", {})
            if {n: got.get(n) for n in digests} != digests:
                return False
        return True

    deadline = time.monotonic() + wait_s
    while not now():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
