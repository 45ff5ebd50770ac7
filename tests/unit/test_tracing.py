"""Tracing is off unless asked for, and then only to a collector it may talk to."""

from __future__ import annotations

import pytest

from ckpt_daemon.main import parse_args
from ckpt_daemon.observe.tracing import check_endpoint


@pytest.mark.parametrize(
    "url",
    ["https://otel.example:4318/v1/traces", "http://127.0.0.1:4318/v1/traces",
     "http://localhost:4318/v1/traces", "http://[::1]:4318/v1/traces"],
)  # fmt: skip
def test_endpoints_accepted(url: str) -> None:
    check_endpoint(url)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:4318/v1/traces", "ftp://127.0.0.1/x", "127.0.0.1:4318", "http://"]
)
def test_endpoints_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_endpoint(url)


def test_off_by_default_and_settable_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([]).otel_endpoint == ""
    monkeypatch.setenv("CKPTD_OTEL_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    assert parse_args([]).otel_endpoint == "http://127.0.0.1:4318/v1/traces"
