"""Who may call ckptd: the pure decisions, then real ckptd and agents with the local admin
token, an auth file with roles, and TLS with client certificates (SAN = node id)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckpt.v1 import agent_pb2, ckptd_pb2
from ckpt_client.client import Client
from ckpt_common.credentials import Credentials
from ckpt_common.errors import PermissionDenied, Unauthenticated
from ckpt_daemon.security import auth
from ckpt_daemon.security.auth import AccessPolicy, Principal, Role, authorize
from ckpt_daemon.security.certs import add_token, make_certs
from tests.support.cluster import PY, REPO, Cluster, wait_for
from tests.support.tensors import mixed_tensors, write_sharded
from tests.unit.test_deploy import probe_command

pytestmark = pytest.mark.slow


def who(*roles: Role, node: str = "") -> Principal:
    return Principal(name="p", roles=frozenset(roles), node=node)


def test_every_method_has_a_role_and_nothing_else_passes() -> None:
    for svc in (
        ckptd_pb2.DESCRIPTOR.services_by_name["Ckpt"],
        agent_pb2.DESCRIPTOR.services_by_name["AgentLink"],
    ):
        for m in svc.methods:
            assert f"/{svc.full_name}/{m.name}" in auth.METHOD_ROLES, m.name
    assert "not a ckptd method" in authorize("/ckpt.v1.Ckpt/Nope", who(Role.ADMIN))
    assert "no credentials" in authorize("/ckpt.v1.Ckpt/ListAgents", None)
    assert authorize("/grpc.health.v1.Health/Check", None) == ""
    assert "no credentials" in authorize("/grpc.reflection.v1alpha.ServerReflection/X", None)


@pytest.mark.parametrize(
    "method, allowed",
    [
        ("PushCheckpoint", {Role.TRAINER}),
        ("CommitPush", {Role.TRAINER}),
        ("Update", {Role.OPERATOR}),
        ("DeleteCheckpoint", {Role.OPERATOR}),
        ("CancelJob", {Role.OPERATOR}),
        ("RegisterInstance", {Role.AUTOSCALER}),
        ("JoinInstance", {Role.AUTOSCALER}),
        ("ListAgents", {Role.READER}),
        ("WatchJob", {Role.READER}),
    ],
)
def test_roles(method: str, allowed: set[Role]) -> None:
    full = "/ckpt.v1.Ckpt/" + method
    for r in Role:
        ok = authorize(full, who(r)) == ""
        assert ok == (r in allowed or r == Role.ADMIN), (method, r)
    assert authorize("/ckpt.v1.AgentLink/Attach", who(Role.AGENT, node="n1")) == ""
    assert "lacks role agent" in authorize("/ckpt.v1.AgentLink/Attach", who(Role.OPERATOR))


def test_policy_file_and_identities(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    add_token(f, "t1", ["trainer", "reader"], "", tmp_path / "t1.token")
    add_token(f, "a1", ["agent"], "n1", tmp_path / "a1.token")
    d = json.loads(f.read_text())
    d["clients"] = {"ops": ["operator"]}
    f.write_text(json.dumps(d))
    assert os.stat(tmp_path / "t1.token").st_mode & 0o777 == 0o600
    p = auth.load_policy(str(f))
    t1 = p.from_token((tmp_path / "t1.token").read_text().strip())
    assert t1 and t1.roles == {Role.TRAINER, Role.READER}
    a1 = p.from_token((tmp_path / "a1.token").read_text().strip())
    assert a1 and a1.node == "n1"
    assert p.from_token("guess") is None
    assert p.from_uris(["spiffe://ckpt/agent/n7"]).node == "n7"
    assert p.from_uris(["spiffe://ckpt/client/ops"]).roles == {Role.OPERATOR}
    assert p.from_uris(["spiffe://ckpt/client/nobody"]).roles == frozenset()
    assert p.from_uris(["spiffe://other/agent/n1", "spiffe://ckpt/agent/"]) is None
    assert t1.uid is None and a1.uid is None  # no uid: only files everyone may read
    d["tokens"][0]["uid"] = 1000
    d["clients"]["tr"] = {"roles": ["trainer"], "uid": 1001}
    f.write_text(json.dumps(d))
    p = auth.load_policy(str(f))
    assert p.from_token((tmp_path / "t1.token").read_text().strip()).uid == 1000
    assert p.from_uris(["spiffe://ckpt/client/tr"]).uid == 1001
    assert auth.local_admin_policy(str(tmp_path / "s"))[0].tokens.popitem()[1].uid == os.getuid()
    for bad, why in (
        ({"tokens": [{"name": "x", "sha256": "ab", "roles": ["reader"]}]}, "64 hex"),
        ({"tokens": [{"name": "x", "sha256": "a" * 64, "roles": ["root"]}]}, "roles must be"),
        ({"tokens": [{"name": "x", "sha256": "a" * 64, "roles": ["agent"]}]}, "name its node"),
        ({"tokens": [], "extra": 1}, "want an object"),
        ({"tokens": [{"name": "x", "sha256": "a" * 64, "roles": ["reader"], "uid": "0"}]}, "uid"),
        ({"tokens": [{"name": "x", "sha256": "a" * 64, "roles": ["reader"], "uid": -1}]}, "uid"),
        ({"clients": {"c": {"roles": ["reader"], "uid": True}}}, "uid"),
    ):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=why):
            auth.load_policy(str(f))


def test_listen_and_local_token(tmp_path: Path) -> None:
    assert auth.listen_refusal("127.0.0.1:0", tls=False, insecure=False) == ""
    assert auth.listen_refusal("[::1]:7601", tls=False, insecure=False) == ""
    assert "beyond loopback" in auth.listen_refusal("0.0.0.0:7601", tls=False, insecure=False)
    assert auth.listen_refusal("0.0.0.0:7601", tls=True, insecure=False) == ""
    assert auth.listen_refusal("0.0.0.0:7601", tls=False, insecure=True) == ""
    policy, path = auth.local_admin_policy(str(tmp_path / "s"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "s").st_mode & 0o777 == 0o700
    token = Path(path).read_text().strip()
    assert policy.from_token(token).roles == {Role.ADMIN}
    assert auth.local_admin_policy(str(tmp_path / "s"))[0].from_token(token)  # kept
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="0600"):
        auth.local_admin_policy(str(tmp_path / "s"))
    assert not AccessPolicy(enabled=False).tokens


# ------------------------------------------------------------------ real processes


def test_local_token_is_required_and_private(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    try:
        c.start_daemon()
        c.start_agent("n1", 1)
        c.wait_ranks(1)  # the agent attached with the token from the environment
        with Client(c.addr, credentials=Credentials(token="wrong")) as bad:
            with pytest.raises(Unauthenticated):
                bad.agents()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")}
        r = subprocess.run(
            [PY, "-m", "ckptctl.cli", "--addr", c.addr, "get", "checkpoints"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "HOME": str(tmp_path)},
        )
        assert r.returncode == 3 and "UNAUTHENTICATED" in r.stderr, r.stderr
        with grpc.insecure_channel(c.addr) as ch:  # health needs nothing and shows nothing
            res = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        # another local user cannot read the token (CI runs as root: drop to nobody)
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "cat",
                str(c.token_file),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0 and "Permission denied" in r.stderr
        assert len(c.client.agents()) == 1
    finally:
        c.close()


def test_roles_from_an_auth_file(tmp_path: Path) -> None:
    f = tmp_path / "auth.json"
    for name, roles, node in (
        ("trainer", "trainer,reader", ""),
        ("reader", "reader", ""),
        ("ops", "operator,reader", ""),
        ("agent-n1", "agent", "n1"),
    ):  # the trainer acts as this test's user: its files are in a 0700 tmp dir
        uid = os.getuid() if name == "trainer" else None
        add_token(f, name, roles.split(","), node, tmp_path / f"{name}.token", uid=uid)
    c = Cluster(tmp_path)
    c.env["CKPTD_TOKEN_FILE"] = str(tmp_path / "agent-n1.token")
    try:
        c.start_daemon("--auth-file", str(f))
        c.client.close()
        c.client = trainer = Client(
            c.addr, credentials=Credentials(token_file=str(tmp_path / "trainer.token"))
        )
        c.start_agent("n1", 1)
        c.start_agent("n2", 1)  # the n1 token claiming node n2: refused
        c.wait_ranks(1)
        wait_for(lambda: "PERMISSION_DENIED" in c.log("agent-n2"), 30, "n2 to be refused")
        assert [a.node_id for a in trainer.agents()] == ["n1"]
        d = write_sharded(mixed_tensors(3, layers=1), tmp_path / "w")
        trainer.push("m", 1, [str(d)])
        with pytest.raises(PermissionDenied, match="lacks role operator"):
            trainer.update("m", 1, ranks=[0])
        creds = {n: Credentials(token_file=str(tmp_path / f"{n}.token")) for n in ("reader", "ops")}
        with Client(c.addr, credentials=creds["reader"]) as reader:
            assert [x.version for x in reader.checkpoints("m")] == [1]
            with pytest.raises(PermissionDenied, match="lacks role trainer"):
                reader.push("m", 2, [str(d)])
            with pytest.raises(PermissionDenied):
                reader.delete("m", 1)
        with Client(c.addr, credentials=creds["ops"]) as ops:
            with pytest.raises(PermissionDenied, match="lacks role autoscaler"):
                ops.remove_instance("x")
            ops.delete("m", 1)
    finally:
        c.close()


def test_mtls_agents_are_their_node_and_clients_need_a_certificate(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_certs(certs, ["n1"], ["ops", "probe"], [])
    f = tmp_path / "auth.json"
    f.write_text(json.dumps({"tokens": [], "clients": {"ops": ["operator", "reader"]}}))
    c = Cluster(tmp_path)
    ca = str(certs / "ca.pem")
    c.env.update(
        {
            "CKPTD_TLS_CA": ca,
            "CKPTD_TLS_CERT": str(certs / "agent-n1.pem"),
            "CKPTD_TLS_KEY": str(certs / "agent-n1.key"),
        }
    )
    c.env.pop("CKPTD_TOKEN_FILE")
    tls = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
    try:
        port_file = tmp_path / "port"
        c._spawn(
            "ckptd",
            [
                "-m",
                "ckpt_daemon.main",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(c.state_dir),
                "--port-file",
                str(port_file),
                "--heartbeat-s",
                "0.5",
                *tls,
                "--tls-ca",
                ca,
                "--auth-file",
                str(f),
            ],
        )
        wait_for(port_file.exists, 30, "ckptd")
        c.port = int(port_file.read_text())
        c.client = Client(
            c.addr,
            credentials=Credentials(
                tls_ca=ca,
                tls_cert=str(certs / "client-ops.pem"),
                tls_key=str(certs / "client-ops.key"),
            ),
        )
        c.start_agent("n1", 1)
        c.start_agent("n2", 1)  # n1's certificate claiming node n2
        c.wait_ranks(1)
        wait_for(lambda: "PERMISSION_DENIED" in c.log("agent-n2"), 30, "n2 to be refused")
        assert [a.node_id for a in c.client.agents()] == ["n1"]
        with pytest.raises(PermissionDenied, match="lacks role trainer"):
            c.client.push("m", 1, ["/nonexistent"])
        with Client(c.addr, credentials=Credentials(tls_ca=ca), timeout_s=5) as anon:
            with pytest.raises(Exception):  # noqa: B017  no client certificate: no handshake
                anon.agents()
        with grpc.insecure_channel(c.addr) as ch:  # plaintext to a TLS port
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError):
                stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
        # the Kubernetes probe's own command line (its paths here): mTLS, no role needed
        here = {"/etc/ckptd/tls/": f"{certs}/", "/etc/ckptd/probe/": f"{certs}/",
                "localhost:7601": f"localhost:{c.port}"}  # fmt: skip
        cmd = list(probe_command())
        for a, b in here.items():
            cmd = [x.replace(a, b) for x in cmd]
        bare = {k: v for k, v in c.env.items() if not k.startswith("CKPTD_")}
        r = subprocess.run([PY, "-m", "ckptctl.cli", *cmd[1:]], capture_output=True, text=True,
                           timeout=60, env=bare)  # fmt: skip
        assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
        r = subprocess.run([PY, "-m", "ckptctl.cli", *[x for x in cmd[1:] if "client-" not in x]],
                           capture_output=True, text=True, timeout=60, env=bare)  # fmt: skip
        assert r.returncode == 3, r.stderr  # no client certificate: no handshake
    finally:
        c.close()


def test_refuses_plaintext_beyond_loopback(tmp_path: Path) -> None:
    base = [PY, "-m", "ckpt_daemon.main", "--state-dir", str(tmp_path / "s")]
    r = subprocess.run(
        [*base, "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert r.returncode != 0 and "beyond loopback" in r.stderr
    with pytest.raises(ValueError, match="not loopback"):
        Client("10.1.2.3:7601", credentials=Credentials(token="x"))
