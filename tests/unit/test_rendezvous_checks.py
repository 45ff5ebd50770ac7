"""The pure checks behind local rendezvous (ckpt_common.rendezvous): who owns and who can
write a directory, a segment, a file; who is at the other end of a socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq

from ckpt_agent import shm
from ckpt_common import ipc, rendezvous
from ckpt_common.rendezvous import (
    RendezvousError,
    dir_refusal,
    ensure_private_dir,
    parents_refusal,
    parse_uids,
    peer_refusal,
    peer_uid,
)

NOBODY = 65534
ME = frozenset({os.geteuid()})
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user")


class Frame:
    def __init__(self, addr: object) -> None:
        self.addr = addr

    def get(self, key: str) -> object:
        if isinstance(self.addr, Exception):
            raise self.addr
        assert key == "Peer-Address"
        return self.addr


def test_uids_from_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_uids(" 0, 12345,,root") == {0, 12345}
    with pytest.raises(ValueError, match="no-such-user-x"):
        parse_uids("no-such-user-x")
    monkeypatch.setenv(rendezvous.PEER_UIDS_ENV, "12345")
    assert rendezvous.trusted_uids() == {os.geteuid(), 0, 12345}
    assert rendezvous.others_allowed()
    monkeypatch.setenv(rendezvous.PEER_UIDS_ENV, f"{os.geteuid()},0")
    assert not rendezvous.others_allowed()
    monkeypatch.setenv(rendezvous.PEER_UIDS_ENV, "bad user")
    with pytest.raises(RendezvousError):
        rendezvous.trusted_uids()
    assert "bad user" in ipc.socket_dir_refusal("ipc:///run/ckpt/x.sock")


def test_peer_credentials() -> None:
    assert peer_uid(Frame("localhost:1000:1000:42")) == 1000
    for bad in ("", "localhost:x:1:2", "1.2.3.4:5", zmq.ZMQError(22)):
        assert peer_uid(Frame(bad)) is None
    assert peer_refusal(Frame("localhost:0:0:1"), {0}) == ""
    assert "uid 65534" in peer_refusal(Frame("localhost:65534:65534:1"), {0, 1000})
    assert "unknown" in peer_refusal(Frame(zmq.ZMQError(22)), {0})


def test_the_kernel_names_the_peer_on_both_ends(tmp_path: Path) -> None:
    ctx = zmq.Context()  # its own: nothing an earlier test left in the shared one can stall it
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind(f"ipc://{tmp_path}/s.sock")
        dealer.connect(f"ipc://{tmp_path}/s.sock")
        dealer.send(b"hi")
        assert router.poll(5000)
        ident, frame = router.recv_multipart(copy=False)
        assert peer_uid(frame) == os.geteuid()
        router.send_multipart([ident.bytes, b"yo"])
        assert dealer.poll(5000)
        assert peer_uid(dealer.recv(copy=False)) == os.geteuid()
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_directories(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    assert dir_refusal(str(good), ME) == ""
    (tmp_path / "link").symlink_to(good)
    assert "is a link" in dir_refusal(str(tmp_path / "link"), ME)
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    assert "writable by others" in dir_refusal(str(loose), ME)
    (loose / "d").mkdir(mode=0o700)
    assert "without the sticky bit" in parents_refusal(str(loose / "d"), ME)
    loose.chmod(0o1777)  # /tmp: entries are their owners'
    assert dir_refusal(str(loose / "d"), ME) == ""
    assert "No such file" in dir_refusal(str(tmp_path / "none"), ME)
    (tmp_path / "f").write_text("")
    assert "not a directory" in dir_refusal(str(tmp_path / "f"), ME)


@needs_root
def test_directories_of_another_user(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    assert "owned by uid 65534" in dir_refusal(str(theirs), ME)
    (theirs / "mine").mkdir(mode=0o700)
    assert "owned by uid 65534" in parents_refusal(str(theirs / "mine"), ME)
    # a link nobody owns on the way (in a sticky dir), even to a good dir
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (tmp_path / "good").mkdir(mode=0o700)
    (sticky / "l").symlink_to(tmp_path)
    os.lchown(sticky / "l", NOBODY, NOBODY)
    assert "link owned by uid 65534" in parents_refusal(str(sticky / "l" / "good"), ME)


def test_the_agent_makes_its_dir_or_takes_its_own(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = ensure_private_dir(str(tmp_path / "a" / "ipc"))
    finally:
        os.umask(old)
    assert made == os.path.realpath(tmp_path / "a" / "ipc")
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    os.chmod(made, 0o755)  # its own, readable: tightened
    ensure_private_dir(made)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    ensure_private_dir(made, 0o711)
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o711
    os.chmod(made, 0o777)  # writable by others: someone may have put things in it
    with pytest.raises(RendezvousError, match="writable by others"):
        ensure_private_dir(made)
    (tmp_path / "l").symlink_to(tmp_path / "a")
    with pytest.raises(RendezvousError, match="link"):
        ensure_private_dir(str(tmp_path / "l"))


@needs_root
def test_the_agent_refuses_a_dir_another_user_made(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / "ckpt-ipc"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(RendezvousError, match="owned by uid 65534"):
        ensure_private_dir(str(theirs))
    st = theirs.stat()
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o777  # untouched
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(RendezvousError, match="sticky"):
        ensure_private_dir(str(loose / "ipc"))
    assert not (loose / "ipc").exists()


def test_default_dirs_are_off_world_writable_parents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ipc.IPC_DIR_ENV, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert ipc.ipc_dir() == "/run/ckpt"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert ipc.ipc_dir() == "/run/user/1000/ckpt"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("HOME", "/home/u")
    assert ipc.ipc_dir() == "/home/u/.ckpt/ipc"
    assert ipc.ipc_dir("/x") == "/x"
    assert ipc.path_length_problem(ipc.worker_endpoint("n" * 64, 7, "/run/ckpt")) == ""
    assert "too long" in ipc.path_length_problem(ipc.worker_endpoint("n1", 0, "/" + "d" * 90))


def test_an_engine_refuses_a_loose_ipc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ipc.IPC_DIR_ENV, str(tmp_path))
    endpoint = ipc.worker_endpoint("n1", 0)
    assert ipc.endpoint_refusal(endpoint) == ""
    tmp_path.chmod(0o777)
    try:
        assert "writable by others" in ipc.endpoint_refusal(endpoint)
    finally:
        tmp_path.chmod(0o700)


def test_segments_someone_else_could_write_are_not_mapped() -> None:
    name = f"ckpt-test-seg-{os.getpid()}"
    mem = shm.create(name, 64)
    try:
        assert stat.S_IMODE(os.fstat(mem._fd).st_mode) == 0o600
        shm.attach(name).close()
        os.fchmod(mem._fd, 0o666)
        with pytest.raises(shm.UntrustedSegment, match="writable by others"):
            shm.attach(name)
        os.fchmod(mem._fd, 0o600)
        with pytest.raises(shm.UntrustedSegment, match="not by a trusted uid"):
            shm.attach(name, trusted={os.geteuid() + 1})
        if os.geteuid() == 0:
            os.fchown(mem._fd, NOBODY, NOBODY)
            with pytest.raises(shm.UntrustedSegment, match="owned by uid 65534"):
                shm.attach(name)
    finally:
        mem.close()
        shm.unlink(name)


def test_push_tensors_stages_only_in_its_own_dir(tmp_path: Path) -> None:
    """Client.push_tensors stages its file in this user's own dir inside /dev/shm (or the
    directory given): one another user made first (in a sticky dir) is refused, nothing is
    written into it; its own is made 0700 and the file is removed after the push."""
    import torch

    from ckpt_client.client import Client
    from ckpt_common.errors import CkptError

    sticky = tmp_path / "shm"
    sticky.mkdir()
    sticky.chmod(0o1777)
    theirs = sticky / f"ckpt-stage-{os.geteuid()}"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, NOBODY, NOBODY)
    client = Client("127.0.0.1:1")  # never reached: the staging dir is refused first
    try:
        with pytest.raises(RendezvousError, match="owned by uid 65534"):
            client.push_tensors("m", 1, {"w": torch.zeros(4)}, directory=str(sticky))
        assert list(theirs.iterdir()) == []
        theirs.rmdir()
        with pytest.raises(CkptError):  # the push itself fails (nothing listens)
            client.push_tensors("m", 1, {"w": torch.zeros(4)}, directory=str(sticky), timeout_s=1)
        st = theirs.stat()
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert list(theirs.iterdir()) == []
    finally:
        client.close()
