"""The deployment files: Kubernetes manifests valid against the API's own schemas (strict,
kubernetes-validate, offline), wired together (selectors, ports, secrets), and every
command line in them (manifests, systemd units) accepted by the program it starts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ckpt_agent.main import parse_args as agent_args
from ckpt_daemon.main import parse_args as daemon_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ["1.30.0", "1.33.0"]


def docs() -> list[dict]:
    names = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    out = []
    for name in names:
        out += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return out


def by_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def test_kustomization_lists_every_manifest() -> None:
    names = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert names == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    import kubernetes_validate

    checked = 0
    for d in docs():
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked against the Service below
        kubernetes_validate.validate(d, version, strict=True)
        checked += 1
    assert checked >= 4


def test_wiring_selectors_ports_and_secrets() -> None:
    svc = next(d for d in by_kind("Service") if d["metadata"]["name"] == "ckptd")
    sts = by_kind("StatefulSet")[0]
    pod = sts["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == "ckptd" and sts["spec"]["replicas"] == 1
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    mon = by_kind("ServiceMonitor")[0]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= {
        p["name"] for p in svc["spec"]["ports"]
    }
    mounts = [v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]]
    assert "state" in mounts
    ds = by_kind("DaemonSet")[0]["spec"]["template"]["spec"]
    assert (
        ds["hostIPC"]
        and "IPC_LOCK" in ds["containers"][0]["securityContext"]["capabilities"]["add"]
    )
    env = {e["name"]: e for e in ds["containers"][0]["env"]}
    assert env["CKPT_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "nvidia.com/gpu" not in str(ds["containers"][0].get("resources", {}))
    for f in ("ckptd.yaml", "agent.yaml"):  # every secret used is named in the header
        text = (K8S / f).read_text()
        for secret in re.findall(r"secretName: ([\w-]+)", text):
            assert re.search(rf"^#.*{secret}", text, re.M), (f, secret)


def _container(kind: str) -> dict:
    return by_kind(kind)[0]["spec"]["template"]["spec"]["containers"][0]


def test_manifest_command_lines_are_accepted() -> None:
    cfg = daemon_args(_container("StatefulSet")["args"])
    assert cfg.listen == "0.0.0.0:7601" and cfg.tls_cert and cfg.tls_ca and cfg.auth_file
    assert cfg.drain_s > 0
    a = agent_args(_container("DaemonSet")["args"])
    assert a.device == "cuda" and a.daemon.startswith("ckptd.") and a.credentials.tls_cert


def probe_command() -> list[str]:
    """The exec probe ckptd's pod runs (startup and readiness: the same command)."""
    probes = _container("StatefulSet")
    cmd = probes["readinessProbe"]["exec"]["command"]
    assert probes["startupProbe"]["exec"]["command"] == cmd
    return cmd


def test_probe_command_line_is_accepted() -> None:
    from ckptctl.verbs import health

    cmd = probe_command()
    assert cmd[:2] == ["ckptctl", "health"]
    health.make_context("health", cmd[2:])  # parses: raises on an unknown option


def _exec_start(unit: str) -> list[str]:
    text = (DEPLOY / unit).read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))[1:]


def test_systemd_units_start_valid_command_lines() -> None:
    cfg = daemon_args(_exec_start("ckptd.service"))
    assert cfg.tls_cert and cfg.auth_file
    unit = (DEPLOY / "ckptd.service").read_text()
    assert "StateDirectory=ckptd" in unit and "CKPTD_LISTEN=127.0.0.1:" in unit
    assert agent_args(_exec_start("ckpt-agent.service")).device == "cuda"


def test_the_image_copies_what_exists() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    root = DEPLOY.parent
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for name in line.split()[:-1]:  # the last is the destination
            assert (root / name).exists(), name
