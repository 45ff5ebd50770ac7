"""`ckptd certs` and `ckptd token`: a development CA and credentials for tests and the demo.

    ckptd certs --out DIR --node n1 --node n2 --client ops [--host 10.0.0.5]
        DIR/ca.pem (and ca.key), server.pem/.key (SAN: localhost, 127.0.0.1, ::1, --host),
        agent-<node>.pem/.key (SAN URI spiffe://ckpt/agent/<node>),
        client-<name>.pem/.key (SAN URI spiffe://ckpt/client/<name>). Keys are 0600.
    ckptd token --auth-file FILE --name trainer-1 --roles trainer,reader [--node n1] --out F
        a fresh random token written to F (0600); FILE gains its sha256 and roles.

Production keeps its own PKI; these are for a laptop, CI and the demo.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

from ckpt_common.credentials import AGENT_URI, CLIENT_URI
from ckpt_daemon.security.auth import Role, token_digest


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _save(out: Path, stem: str, key, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    _write(
        out / f"{stem}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)


def _issue(ca_key, ca_cert, cn: str, sans: list, *, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_certs(out: Path, nodes: list[str], clients: list[str], hosts: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ckpt dev CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _save(out, "ca", ca_key, ca)
    sans: list = [x509.DNSName("localhost")]
    for h in ["127.0.0.1", "::1", *hosts]:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    _save(out, "server", *_issue(ca_key, ca, "ckptd", sans, server=True))
    for n in nodes:
        uri = x509.UniformResourceIdentifier(AGENT_URI + n)
        _save(out, f"agent-{n}", *_issue(ca_key, ca, f"agent {n}", [uri], server=False))
    for c in clients:
        uri = x509.UniformResourceIdentifier(CLIENT_URI + c)
        _save(out, f"client-{c}", *_issue(ca_key, ca, c, [uri], server=False))


def add_token(
    auth_file: Path, name: str, roles: list[str], node: str, out: Path, *, uid: int | None = None
) -> None:
    """A new token in an auth file (ckpt_daemon.security.auth); uid: the local user it acts as."""
    for r in roles:
        Role(r)  # ValueError on an unknown role
    token = secrets.token_hex(32)
    d = json.loads(auth_file.read_text()) if auth_file.exists() else {"tokens": [], "clients": {}}
    entry = {"name": name, "sha256": token_digest(token), "roles": roles}
    if node:
        entry["node"] = node
    if uid is not None:
        entry["uid"] = uid
    d.setdefault("tokens", []).append(entry)
    _write(auth_file, (json.dumps(d, indent=1) + "\n").encode(), private=True)
    _write(out, (token + "\n").encode(), private=True)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ckptd")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="a development CA, server, agent and client certificates")
    c.add_argument("--out", required=True)
    c.add_argument("--node", action="append", default=[], help="an agent's node id")
    c.add_argument("--client", action="append", default=[], help="a client's name")
    c.add_argument("--host", action="append", default=[], help="another name of ckptd's host")
    t = sub.add_parser("token", help="a new bearer token in an auth file")
    t.add_argument("--auth-file", required=True)
    t.add_argument("--name", required=True)
    t.add_argument("--roles", required=True, help=f"comma-separated: {[r.value for r in Role]}")
    t.add_argument("--node", default="", help="agents: the node id the token may attach as")
    t.add_argument("--out", required=True, help="write the token here (0600)")
    t.add_argument(
        "--uid",
        type=int,
        default=None,
        help="the local user the token acts as: agents read only the files it pushes that "
        "this user could read (without: only files everyone may read)",
    )
    a = p.parse_args(argv)
    if a.cmd == "certs":
        make_certs(Path(a.out), a.node, a.client, a.host)
    else:
        add_token(Path(a.auth_file), a.name, a.roles.split(","), a.node, Path(a.out), uid=a.uid)
