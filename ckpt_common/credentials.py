"""How clients and agents prove who they are to ckptd, and check that ckptd is ckptd.

- A bearer token (`authorization: Bearer ...` on every call): `--token-file`, env
  CKPTD_TOKEN_FILE or CKPTD_TOKEN, else the local admin token ckptd writes (0600) into its
  default state dir, readable only by ckptd's user.
- TLS (grpc's own credentials): `--tls-ca` verifies ckptd's certificate; `--tls-cert` and
  `--tls-key` present a client certificate (agents: SAN URI spiffe://ckpt/agent/<node id>;
  clients: spiffe://ckpt/client/<name>, see ckpt_daemon.security.certs).

A token never travels in clear text beyond loopback: a channel to another host needs TLS.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import grpc

TOKEN_ENV = "CKPTD_TOKEN"
TOKEN_FILE_ENV = "CKPTD_TOKEN_FILE"
TLS_CA_ENV = "CKPTD_TLS_CA"
TLS_CERT_ENV = "CKPTD_TLS_CERT"
TLS_KEY_ENV = "CKPTD_TLS_KEY"
ADMIN_TOKEN_FILE = "admin.token"  # in ckptd's state dir
DEFAULT_STATE_DIR = os.path.expanduser("~/.local/state/ckptd")
AGENT_URI = "spiffe://ckpt/agent/"
CLIENT_URI = "spiffe://ckpt/client/"


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_addr(addr: str) -> tuple[str, str]:
    """("host", "port") of "host:port" or "[v6]:port"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address {addr!r} is not host:port")
    return host.strip("[]"), port


def read_secret(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """What a client or agent presents. Empty fields: resolved from the environment."""

    token: str = ""
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    insecure: bool = False  # allow a plaintext channel beyond loopback (ckptd --insecure)

    def resolved(self, *, read_token: bool = True) -> Credentials:
        token_file = self.token_file or os.environ.get(TOKEN_FILE_ENV, "")
        token = self.token or os.environ.get(TOKEN_ENV, "")
        if not token and not token_file:
            local = os.path.join(DEFAULT_STATE_DIR, ADMIN_TOKEN_FILE)
            token_file = local if os.access(local, os.R_OK) else ""
        if not token and token_file and read_token:
            token = read_secret(token_file)
        return Credentials(
            token=token,
            token_file=token_file,
            tls_ca=self.tls_ca or os.environ.get(TLS_CA_ENV, ""),
            tls_cert=self.tls_cert or os.environ.get(TLS_CERT_ENV, ""),
            tls_key=self.tls_key or os.environ.get(TLS_KEY_ENV, ""),
            insecure=self.insecure,
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        def read(p: str) -> bytes | None:
            if not p:
                return None
            with open(p, "rb") as f:
                return f.read()

        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca),
            private_key=read(self.tls_key),
            certificate_chain=read(self.tls_cert),
        )

    def check_transport(self, addr: str) -> None:
        """A token or a control channel beyond loopback needs TLS."""
        if not self.tls and not self.insecure and not is_loopback_host(split_addr(addr)[0]):
            raise ValueError(f"{addr} is not loopback: connect with TLS (--tls-ca / {TLS_CA_ENV})")


def channel_args(max_message: int = 512 << 20) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
    ]
