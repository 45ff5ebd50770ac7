"""Rank syntax, safetensors headers, dtypes."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from ckpt_common.dtypes import dtype_name, nbytes_of, torch_dtype
from ckpt_common.ranks import format_ranks, parse_ranks
from ckpt_common.safetensors_header import SafetensorsError, expand_source, read_header
from tests.support.tensors import mixed_tensors, write_sharded


def test_parse_and_format_ranks() -> None:
    assert parse_ranks("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_ranks(" 5, 1-2 ,1") == [1, 2, 5]
    assert format_ranks([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    for bad in ("", "a", "3-1", "1-", "-1", ","):
        with pytest.raises(ValueError):
            parse_ranks(bad)


def test_dtypes() -> None:
    assert nbytes_of("BF16", (3, 4)) == 24
    assert nbytes_of("F32", ()) == 4
    for name in ("BF16", "F16", "F32", "F8_E4M3", "I8", "U8", "I64", "BOOL"):
        assert dtype_name(torch_dtype(name)) == name
    with pytest.raises(ValueError):
        nbytes_of("F4", (1,))


def test_read_header_matches_safetensors(tmp_path) -> None:
    t = mixed_tensors(0, layers=1)
    path = tmp_path / "a.safetensors"
    save_file(t, str(path))
    got, size = read_header(str(path))
    raw = path.read_bytes()
    assert size == len(raw)
    assert {x.name for x in got} == set(t)
    for x in got:
        want = t[x.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw[x.data_offset : x.data_offset + x.nbytes] == want
        assert list(x.shape) == list(t[x.name].shape)


def test_corrupt_headers(tmp_path) -> None:
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SafetensorsError, match="does not fit the file"):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(SafetensorsError, match="not UTF-8 JSON"):
        read_header(str(p))
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 8)
    with pytest.raises(SafetensorsError, match="does not fit"):
        read_header(str(p))


def test_expand_source(tmp_path) -> None:
    d = write_sharded(mixed_tensors(0, layers=1), tmp_path / "ck", shards=3)
    files = expand_source(str(d))
    assert len(files) == 3 and all(f.endswith(".safetensors") for f in files)
    with pytest.raises(FileNotFoundError):
        expand_source(str(tmp_path / "missing"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError):
        expand_source(str(tmp_path / "emptydir"))


def test_parallel_safetensors_writer_matches_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file

    from ckptctl.st_writer import write_safetensors

    t = mixed_tensors(3, layers=2)
    t["big"] = torch.randn(3 << 20)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 10_000_000)  # an older, larger file is overwritten
    write_safetensors(t, str(path), threads=4)
    back = load_file(str(path))
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_interface_of_an_address() -> None:
    from ckpt_common.netif import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.123") is None  # TEST-NET: on no interface here
    assert interface_of("::1") is None and interface_of("not an ip") is None


def test_every_ckptd_flag_is_settable_by_env(monkeypatch) -> None:
    import pytest

    from ckpt_daemon.main import parse_args

    monkeypatch.setenv("CKPTD_DRAIN_S", "7")
    monkeypatch.setenv("CKPTD_RECEIVER_TIMEOUT_S", "9.5")
    monkeypatch.setenv("CKPTD_SERVER_TLS_CERT", "/c.pem")
    monkeypatch.setenv("CKPTD_SERVER_TLS_KEY", "/k.pem")
    monkeypatch.setenv("CKPTD_TLS_CERT", "/client.pem")  # a client's: not ckptd's own
    cfg = parse_args([])
    assert (cfg.drain_s, cfg.receiver_timeout_s, cfg.tls_cert) == (7.0, 9.5, "/c.pem")
    assert parse_args(["--drain-s", "1"]).drain_s == 1.0  # the flag wins
    monkeypatch.setenv("CKPTD_INSECURE", "yes")
    assert parse_args([]).insecure
    monkeypatch.setenv("CKPTD_HEARTBEAT_S", "soon")
    with pytest.raises(SystemExit):
        parse_args([])
