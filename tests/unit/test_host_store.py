"""Host stores: parallel loads, and spare segments reused for the next version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import host_store
from ckpt_agent.host_store import HostStore


def _load_cmd(path: Path, version: int, nbytes: int) -> apb.Load:
    half = nbytes // 2
    return apb.Load(
        checkpoint="t",
        version=version,
        nbytes=nbytes,
        read_uid=0,  # as root: the test's tmp dir is root's
        items=[  # the file's two halves, swapped in the store
            apb.LoadItem(path=str(path), file_offset=0, store_offset=half, nbytes=half),
            apb.LoadItem(path=str(path), file_offset=half, store_offset=0, nbytes=half),
        ],
    )


def test_parallel_load_and_spare_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_store, "CHUNK", 1 << 16)
    monkeypatch.setattr(host_store, "PARALLEL_MIN", 1 << 16)
    monkeypatch.setattr(host_store, "SPARE_MIN", 1)
    nbytes = 1 << 20
    released = []
    mems = {}
    hs = HostStore(
        f"node-{os.getpid()}",
        0,
        spares=1,
        release=lambda s: released.append(s),
        roots=(str(tmp_path),),
    )
    try:
        for v in (1, 2, 3):
            data = os.urandom(nbytes)
            src = tmp_path / f"v{v}.bin"
            src.write_bytes(data)
            hs.load(_load_cmd(src, v, nbytes))
            s = hs.get("t", v)
            assert bytes(s.mem.buf[: nbytes // 2]) == data[nbytes // 2 :]
            assert bytes(s.mem.buf[nbytes // 2 : nbytes]) == data[: nbytes // 2]
            assert os.path.exists(f"/dev/shm/{s.segment}")
            mems[v] = s.mem
            if v == 3:  # v1 was dropped: its segment came back for v3, renamed
                assert s.mem is mems[1]
            if v >= 2:
                hs.drop("t", v - 1)
        assert released == []  # spares keep their memory
        hs.drop("t", 3)  # a second spare: the older one (v2's) goes
        assert [r.mem for r in released] == [mems[2]]
    finally:
        hs.close()
    assert len(released) == 2
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(hs._prefix)]


def test_load_reads_only_the_scanned_file(tmp_path: Path) -> None:
    """The load opens the path again: a file swapped (another inode, a link, another size)
    since the scan, or a path outside the roots, is refused and nothing is kept."""
    hs = HostStore(f"node-{os.getpid()}-c", 0, roots=(str(tmp_path),))
    src = tmp_path / "w.bin"
    src.write_bytes(b"a" * 4096)
    st = os.stat(src)

    def load(path: str, **ident: int) -> None:
        item = apb.LoadItem(path=path, file_offset=0, store_offset=0, nbytes=4096, **ident)
        hs.load(apb.Load(checkpoint="c", version=1, nbytes=4096, items=[item], read_uid=0))

    try:
        same = {
            "file_size": 4096,
            "file_dev": st.st_dev,
            "file_ino": st.st_ino,
            "file_ctime_ns": st.st_ctime_ns,
        }
        load(str(src), **same)
        hs.drop("c", 1)
        src.unlink()
        src.write_bytes(b"b" * 4096)  # same name and size, another file
        with pytest.raises(host_store.StoreError, match="changed since it was scanned"):
            load(str(src), **same)
        src.unlink()
        src.symlink_to("/etc/hostname")
        with pytest.raises(host_store.StoreError) as e:
            load(str(src), file_size=4096)
        assert e.value.code in ("PERMISSION_DENIED", "FAILED_PRECONDITION")
        with pytest.raises(host_store.StoreError, match="outside"):
            load("/etc/hostname")
        with pytest.raises(host_store.StoreError):
            hs.get("c", 1)
    finally:
        hs.close()


def test_preallocated_spares_serve_the_first_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spares made at start (pinned through `pin` on CUDA) are taken by loads they fit (a
    store of at least half their size), renamed in place: same memory, same inode."""
    monkeypatch.setattr(host_store, "SPARE_MIN", 1)
    hs = HostStore(f"node-{os.getpid()}-p", 0, spares=2, roots=(str(tmp_path),))
    pinned: list[host_store.Store] = []
    try:
        assert hs.preallocate(3 << 16, pin=pinned.append) == 2
        assert hs.preallocate(3 << 16) == 0  # the spares are full
        inodes = {os.stat(f"/dev/shm/{s.segment}").st_ino for s in pinned}
        assert len(inodes) == 2

        def load(version: int, nbytes: int) -> int:
            src = tmp_path / f"v{version}.bin"
            src.write_bytes(os.urandom(nbytes))
            hs.load(_load_cmd(src, version, nbytes))
            s = hs.get("t", version)
            assert bytes(s.mem.buf[: nbytes // 2]) == src.read_bytes()[nbytes // 2 :]
            return os.stat(f"/dev/shm/{s.segment}").st_ino

        assert load(1, 1 << 16) not in inodes  # under half a spare: fresh memory
        assert load(2, 2 << 16) in inodes
        assert load(3, 3 << 16) in inodes
        assert load(4, 2 << 16) not in inodes  # no spare left
        hs.drop("t", 3)  # back as a spare, its full size kept: it fits a store as large again
        assert load(5, 3 << 16) in inodes
    finally:
        hs.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(hs._prefix)]
