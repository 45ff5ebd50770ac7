"""ckptctl's command group and what every command shares: the connection and output options
(accepted anywhere on the line, before or after the command, as kubectl's are), the client
they build, and how results print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ckpt_client.client import DEFAULT_ADDR, Client
from ckptctl.output import render
from ckptctl.term import table
from ckptctl.views import rows

FORMATS = ("table", "wide", "json", "yaml")
GLOBALS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--addr",), {"help": f"ckptd host:port [env CKPTD_ADDR; default {DEFAULT_ADDR}]"}),
    (("-o", "--output"), {"type": click.Choice(FORMATS),
                          "help": "table (default), wide (more columns), or every field as "
                                  "json or yaml"}),
    (("--token-file",), {"help": "bearer token file [env CKPTD_TOKEN_FILE; default: ckptd's "
                                 "local admin token]"}),
    (("--tls-ca",), {"help": "CA that signed ckptd's certificate [env CKPTD_TLS_CA]"}),
    (("--tls-cert",), {"help": "client certificate, for mTLS [env CKPTD_TLS_CERT]"}),
    (("--tls-key",), {"help": "its private key [env CKPTD_TLS_KEY]"}),
]  # fmt: skip


def _keep(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name:
        ctx.find_root().ensure_object(dict)[param.name] = value


def global_options(f: Callable) -> Callable:
    """Adds the shared options to a command (or the group); the last one given wins."""
    for decls, kw in reversed(GLOBALS):
        f = click.option(*decls, default=None, expose_value=False, callback=_keep, **kw)(f)
    return f


def settings(ctx: click.Context | None = None) -> dict[str, Any]:
    ctx = ctx or click.get_current_context()
    return ctx.find_root().ensure_object(dict)


def output() -> str:
    return settings().get("output") or "table"


def structured() -> bool:
    return output() in ("json", "yaml")


def connect(ctx: click.Context | None = None, timeout_s: float = 30.0) -> Client:
    from ckpt_common.credentials import Credentials

    s = settings(ctx)
    creds = Credentials(
        token_file=s.get("token_file") or "",
        tls_ca=s.get("tls_ca") or "",
        tls_cert=s.get("tls_cert") or "",
        tls_key=s.get("tls_key") or "",
    )
    return Client(s.get("addr") or DEFAULT_ADDR, timeout_s=timeout_s, credentials=creds)


def with_client(f: Callable[..., int]) -> Callable[..., int]:
    """Passes a connected Client as the first argument, closed afterwards."""

    @functools.wraps(f)
    def run(*args: Any, **kw: Any) -> int:
        with connect() as c:
            return f(c, *args, **kw)

    return run


def show(obj: Any, text: str | None = None) -> None:
    """obj as json/yaml when asked for, else text (default: yaml, for a describe)."""
    if structured() or text is None:
        print(render(obj, "yaml" if not structured() else output()))
    else:
        print(text)


def show_list(kind: str, items: list[Any]) -> None:
    if structured():
        print(render(items, output()))
        return
    header, body = rows(kind, items, wide=output() == "wide")
    table(header, body, sys.stdout)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    no_args_is_help=True,
)
@click.version_option(package_name="ckptd", prog_name="ckptctl", message="%(prog)s %(version)s")
@global_options
def cli() -> None:
    """Operate ckptd: push checkpoints, update engines, and see what runs.

    \b
    Exit codes: 0 done; 1 a job failed (or was cancelled); 2 usage;
    3 ckptd refused or could not be reached (its gRPC status on stderr);
    130 interrupted (the work goes on in ckptd).
    """


def command(name: str, **kw: Any) -> Callable[[Callable], click.Command]:
    """A ckptctl command that takes the shared options too."""

    def deco(f: Callable) -> click.Command:
        return cli.command(name, **kw)(global_options(f))

    return deco
