"""Hostile push sources, pure parts: the header parser on fuzzed headers, path confinement,
links, FIFOs, and a file swapped after its scan."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path

import pytest

from ckpt_common import sources
from ckpt_common.read_as import ROOT
from ckpt_common.safetensors_header import SafetensorsError, expand_source, read_header
from ckpt_common.sources import SourceError


def st_file(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


SECRET = b"TOP-SECRET-BYTES"
HOSTILE = [
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1 << 60, 1 << 60], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1 << 62]}},
    {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": 7, "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1]}},
    {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}},
    {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
    {"w": {"dtype": "F32", "shape": [1], "data_offsets": None}},
    {"w": "F32"},
    {"w": None},
    {"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    {"a\nb": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    {"x" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    [1, 2, 3],
    "string",
    None,
]


@pytest.mark.parametrize("header", HOSTILE)
def test_hostile_headers_are_refused_precisely(tmp_path: Path, header: object) -> None:
    p = st_file(tmp_path / "h.safetensors", header, b"\0" * 8)
    with pytest.raises(SafetensorsError) as e:
        read_header(str(p))
    assert "h.safetensors" in str(e.value)


@pytest.mark.parametrize(
    "raw",
    [SECRET, b"\xff\xfe" + SECRET, b"[" * 100000 + b"]" * 100000, b"{" + SECRET, b""],
)
def test_garbage_is_refused_without_quoting_it(tmp_path: Path, raw: bytes) -> None:
    p = st_file(tmp_path / "g.safetensors", None, b"", raw=raw)
    with pytest.raises(SafetensorsError) as e:
        read_header(str(p))
    assert b"SECRET" not in str(e.value).encode() and "\\x" not in str(e.value)


def test_random_bytes_never_raise_anything_else(tmp_path: Path) -> None:
    rng = random.Random(7)
    p = tmp_path / "r.safetensors"
    good = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    for _ in range(300):
        h = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            h[rng.randrange(len(h))] = rng.randrange(256)
        st_file(p, None, b"\0" * 8, raw=bytes(h))
        try:
            read_header(str(p))
        except SafetensorsError:
            pass


def test_confinement(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.safetensors"
    st_file(outside, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    inside = st_file(root / "ok.safetensors", {}, b"")
    roots = (str(root),)
    assert sources.confine(str(inside), roots) == str(inside.resolve())
    for bad, code in (
        (str(outside), "PERMISSION_DENIED"),
        (f"{root}/../secret.safetensors", "PERMISSION_DENIED"),
        ("relative.safetensors", "INVALID_ARGUMENT"),
        (f"{root}/a\nb", "INVALID_ARGUMENT"),
    ):
        with pytest.raises(SourceError) as e:
            sources.confine(bad, roots)
        assert e.value.code == code
    (root / "link.safetensors").symlink_to(outside)  # a link that leaves the roots
    with pytest.raises(SourceError, match="outside"):
        expand_source(str(root / "link.safetensors"), roots, ROOT)
    (root / "in.safetensors").symlink_to(inside)  # a link that stays inside is followed
    assert expand_source(str(root / "in.safetensors"), roots, ROOT) == [str(inside.resolve())]


def test_fifo_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(SourceError, match="not a regular file"):
        sources.open_regular(str(tmp_path / "fifo"), ROOT)
    with pytest.raises(SourceError, match="not a regular file"):
        sources.open_regular("/dev/zero", ROOT)
    with pytest.raises(SourceError) as e:
        sources.open_regular(str(tmp_path / "missing"), ROOT)
    assert e.value.code == "NOT_FOUND"


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    f = st_file(tmp_path / "d" / "w.safetensors", {}, b"")
    real = sources.confine(str(f), (str(tmp_path),))
    fd, st = sources.open_regular(real, ROOT)
    os.close(fd)
    os.rename(tmp_path / "d", tmp_path / "d2")  # a directory on the way becomes a link
    (tmp_path / "d").symlink_to(tmp_path / "d2")
    with pytest.raises(SourceError, match="changed into a link"):
        sources.open_regular(real, ROOT)
    os.unlink(tmp_path / "d")
    os.rename(tmp_path / "d2", tmp_path / "d")
    f.unlink()  # the file itself becomes a link
    f.symlink_to("/etc/hostname")
    with pytest.raises(SourceError, match="changed into a link"):
        sources.open_regular(real, ROOT)
    f.unlink()  # another file under the same name: not the scanned one
    st_file(f, {}, b"1234")
    fd, st2 = sources.open_regular(real, ROOT)
    os.close(fd)
    with pytest.raises(SourceError, match="changed since it was scanned"):
        sources.check_identity(real, st2, st.st_size, st.st_dev, st.st_ino, st.st_ctime_ns)


def test_index_entries_stay_in_their_directory(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for target in ("../secret.safetensors", "/etc/passwd", "a/../../x.safetensors"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
        with pytest.raises(SafetensorsError, match="outside its directory"):
            expand_source(str(d), (str(tmp_path),), ROOT)
    (d / "model.safetensors.index.json").write_bytes(b"\xff" + SECRET)
    with pytest.raises(SafetensorsError, match="not an index") as e:
        expand_source(str(d), (str(tmp_path),), ROOT)
    assert "SECRET" not in str(e.value)


def test_reader_follows_the_kernel_mode_rule() -> None:
    """Owner bits for the owner (even when others may more), else group, else other; uid 0
    everything; nobody in particular: other bits only; a hard-linked file of another user
    is refused even when its bits allow."""
    from ckpt_common.read_as import ANYONE, R, Reader, X

    def st(mode: int, uid: int = 10, gid: int = 20, nlink: int = 1) -> os.stat_result:
        return os.stat_result((0o100000 | mode, 1, 1, nlink, uid, gid, 0, 0, 0, 0))

    owner, member, other = Reader(10), Reader(11, frozenset({20})), Reader(12, frozenset({30}))
    assert owner.may(st(0o600), R) and not member.may(st(0o600), R)
    assert not owner.may(st(0o044), R) and member.may(st(0o044), R)  # owner bits win
    assert other.may(st(0o604), R) and not other.may(st(0o640), R)
    assert ROOT.may(st(0o000), R | X)
    assert ANYONE.may(st(0o004), R) and not ANYONE.may(st(0o660, uid=10), R)
    assert "hard links" in other.refusal(st(0o644, nlink=2), R, "'f'")
    assert owner.refusal(st(0o644, nlink=2), R, "'f'") == ""
    assert ROOT.refusal(st(0o600, nlink=3), R, "'f'") == ""
    assert "may not read" in ANYONE.refusal(st(0o640), R, "'f'")
    assert Reader.of_uid(0).uid == 0 and Reader.of_uid(None) is ANYONE
