"""A push reads only what its principal could read itself: real ckptd and agent (as root, as
CI runs), an auth file whose trainer tokens act as uid 65534 (nobody), as root, or as nobody
in particular (no uid); root-only files, other users' staging files and hard links are
refused before a byte is read, errors carry no file bytes, and hostile headers (duplicate
keys, overlapping tensors) are INVALID_ARGUMENT with nothing stored."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckpt_client.client import Client
from ckpt_common import checksum
from ckpt_common.errors import CkptError, InvalidArgument, PermissionDenied
from tests.support.cluster import Cluster
from tests.support.spec import Auth, ClusterSpec, Node, Token

pytestmark = pytest.mark.slow
NOBODY = 65534
OTHER = 4242  # a user that is neither root nor nobody


def st_bytes(tensors: dict[str, bytes], header: dict | None = None) -> bytes:
    """A safetensors file of U8 tensors (or the given header over their bytes)."""
    h, data, off = {}, b"", 0
    for name, b in tensors.items():
        h[name] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [off, off + len(b)]}
        data, off = data + b, off + len(b)
    raw = json.dumps(header if header is not None else h).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def put(path: Path, data: bytes, mode: int, uid: int = 0) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


TRAINER = ("trainer", "reader")
SPEC = ClusterSpec(  # trainer tokens acting as nobody, as root, as no uid; c.client is root's
    nodes=(Node(id="n1"),),
    auth=Auth(
        tokens=(
            Token(name="nobody", roles=TRAINER, uid=NOBODY),
            Token(name="root", roles=TRAINER, uid=0),
            Token(name="anon", roles=TRAINER),
            Token(name="agent-n1", roles=("agent",), node="n1"),
        ),
        agent="agent-n1",
        client="root",
    ),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "access")


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every user can search, under the agents' source roots (pytest's own tmp
    dirs are 0700: nobody could reach anything in them)."""
    d = Path(tempfile.mkdtemp(prefix="ckpt-access-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nothing_stored(c: Cluster, name: str) -> None:
    assert list(c.client.checkpoints(name)) == []


def refused(client: Client, name: str, path: Path, kind: type[CkptError]) -> str:
    with pytest.raises(kind) as e:
        client.push(name, 1, [str(path)], timeout_s=60)
    return e.value.message


def test_nobody_may_not_push_what_it_cannot_read(cluster: Cluster, world: Path) -> None:
    c, nobody = cluster, cluster.client_as("nobody")
    good = st_bytes({"w": b"secret tensor bytes!"})
    private = world / "private"
    private.mkdir(mode=0o700)
    put(private / "open.safetensors", good, 0o644)  # readable, but its directory is not
    msg = refused(nobody, "dir", private / "open.safetensors", PermissionDenied)
    assert f"uid {NOBODY} may not search directory" in msg and "private" in msg
    nothing_stored(c, "dir")
    put(world / "root.safetensors", good, 0o600)  # root's own file
    msg = refused(nobody, "own", world / "root.safetensors", PermissionDenied)
    assert f"uid {NOBODY} may not read" in msg
    nothing_stored(c, "own")
    # another user's staging file in /dev/shm, as Client.push_tensors leaves it
    staged = put(Path(f"/dev/shm/ckpt-push-x-1-{os.getpid()}.safetensors"), good, 0o600, OTHER)
    try:
        refused(nobody, "staged", staged, PermissionDenied)
        nothing_stored(c, "staged")
        refused(c.client_as("anon"), "staged", staged, PermissionDenied)
    finally:
        staged.unlink()
    # a directory source nobody may not list
    shard_dir = world / "shards"
    shard_dir.mkdir(mode=0o711)
    put(shard_dir / "a.safetensors", good, 0o644)
    msg = refused(nobody, "listing", shard_dir, PermissionDenied)
    assert "may not list directory" in msg
    nothing_stored(c, "listing")


def test_hard_links_reach_nothing_hidden(cluster: Cluster, world: Path) -> None:
    c, nobody = cluster, cluster.client_as("nobody")
    hidden = world / "hidden"
    hidden.mkdir(mode=0o700)
    good = st_bytes({"w": b"hidden tensor bytes!"})
    secret = put(hidden / "secret.safetensors", good, 0o600)
    os.link(secret, world / "link600.safetensors")  # the same inode: root's, 0600
    refused(nobody, "link", world / "link600.safetensors", PermissionDenied)
    os.chmod(secret, 0o644)  # readable bits, but only reachable through the link
    msg = refused(nobody, "link", world / "link600.safetensors", PermissionDenied)
    assert "hard links" in msg
    nothing_stored(c, "link")
    assert c.client.push("link", 1, [str(world / "link600.safetensors")]).version == 1  # root


def test_what_nobody_may_read_is_pushed_byte_exact(cluster: Cluster, world: Path) -> None:
    nobody = cluster.client_as("nobody")
    data = {"a": os.urandom(4096), "b": os.urandom(1000)}
    for i, (mode, uid) in enumerate(((0o644, 0), (0o600, NOBODY))):  # everyone's, its own
        f = put(world / f"ok{i}.safetensors", st_bytes(data), mode, uid)
        cp = nobody.push(f"ok{i}", 1, [str(f)], timeout_s=60)
        got = {t.name: t.checksum for t in nobody.get(f"ok{i}", 1, tensors=True).tensors}
        want = {n: checksum.of_numpy(np.frombuffer(b, dtype=np.uint8)) for n, b in data.items()}
        assert cp.version == 1 and got == want


def test_no_uid_pushes_only_what_everyone_may_read(cluster: Cluster, world: Path) -> None:
    anon = cluster.client_as("anon")
    good = st_bytes({"w": b"x" * 64})
    assert anon.push("anon", 1, [str(put(world / "pub.safetensors", good, 0o644))]).version == 1
    mine = put(world / "mine.safetensors", good, 0o640)
    msg = refused(anon, "anon-own", mine, PermissionDenied)
    assert "everyone may not read" in msg


def test_errors_carry_no_file_bytes(cluster: Cluster, world: Path) -> None:
    c, nobody = cluster, cluster.client_as("nobody")
    head = b"SECRETPW"  # read as a header length: 0x5750...
    blob = head + b"-more-secret-bytes-" * 8
    f = put(world / "shadow", blob, 0o600)
    n = struct.unpack("<Q", head)[0]
    for client, kind in ((nobody, PermissionDenied), (c.client, InvalidArgument)):
        msg = refused(client, "leak", f, kind)
        for secret in (str(n), hex(n), head.decode(), "more-secret"):
            assert secret not in msg, msg
    # a length that fits the file but a header that is not JSON: nothing of it quoted
    raw = b'{"w": SECRETSTUFF'
    f2 = put(world / "notjson", struct.pack("<Q", len(raw)) + raw, 0o644)
    msg = refused(c.client, "leak", f2, InvalidArgument)
    assert "SECRETSTUFF" not in msg and "not UTF-8 JSON" in msg
    nothing_stored(c, "leak")


def test_duplicate_keys_and_overlaps_change_nothing(cluster: Cluster, world: Path) -> None:
    c = cluster
    a = {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}
    dup = b'{"w": %s, "w": %s}' % (json.dumps(a).encode(), json.dumps(a).encode())
    f = put(world / "dup.safetensors", struct.pack("<Q", len(dup)) + dup + b"\0" * 8, 0o644)
    assert "twice" in refused(c.client, "hostile", f, InvalidArgument)
    for name, header in (
        ("same", {"w": a, "v": a}),
        ("overlap", {"w": a, "v": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}),
    ):
        g = put(world / f"{name}.safetensors", st_bytes({"x": bytes(12)}, header), 0o644)
        assert "overlap" in refused(c.client, "hostile", g, InvalidArgument)
    nothing_stored(c, "hostile")
    ok = put(world / "ok.safetensors", st_bytes({"w": bytes(8), "v": bytes(8)}), 0o644)
    assert c.client.push("hostile", 1, [str(ok)]).version == 1  # nothing was left behind
