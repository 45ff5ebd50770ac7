"""kubectl's verbs over ckptd's resources: get, describe, delete, cancel, watch; `status`
(everything at a glance), `health` (for probes), `completion` (shell scripts)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from click.shell_completion import CompletionItem, get_completion_class

from ckpt_client.client import Client
from ckpt_common.errors import NotFound
from ckptctl.actions import WAIT_MARGIN_S, split_ref, wait_and_report
from ckptctl.app import (
    cli,
    command,
    connect,
    output,
    show,
    show_list,
    structured,
    with_client,
)
from ckptctl.watching import watch_list

KINDS = {
    "checkpoints": ("checkpoints", "checkpoint", "cp", "ckpt"),
    "jobs": ("jobs", "job"),
    "agents": ("agents", "agent", "node", "nodes"),
    "instances": ("instances", "instance", "inst"),
    "all": ("all",),
}
ALIASES = {alias: kind for kind, names in KINDS.items() for alias in names}
COMPLETE_TIMEOUT_S = 2.0


class Kind(click.ParamType):
    """A resource kind, by any of its names (kubectl's singular, plural, short)."""

    name = "kind"

    def __init__(self, kinds: tuple[str, ...]) -> None:
        self.kinds = kinds

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        kind = ALIASES.get(str(value).lower())
        if kind not in self.kinds:
            self.fail(f"{value!r} is not one of {', '.join(self.kinds)}", param, ctx)
        return kind

    def shell_complete(self, ctx: Any, param: Any, incomplete: str) -> list[CompletionItem]:
        return [CompletionItem(k) for k in self.kinds if k.startswith(incomplete)]


def ref_of(kind: str, x: Any) -> str:
    """The NAME a command takes for x: NAME@VERSION, a job id, a node id, an instance name."""
    if kind == "checkpoints":
        return f"{x.name}@{x.version}"
    if kind == "jobs":
        return x.id
    return x.node_id if kind == "agents" else x.name


def _names(ctx: click.Context, kind: str) -> list[str]:
    """What the server has of kind (for completion): empty when it cannot be asked."""
    if kind == "all":
        return []
    try:
        with connect(ctx, timeout_s=COMPLETE_TIMEOUT_S) as c:
            return [ref_of(kind, x) for x in _list(c, kind, 50)]
    except Exception:
        return []


def complete_ref(ctx: click.Context, param: Any, incomplete: str) -> list[CompletionItem]:
    kind = ctx.params.get("kind") or "jobs"
    return [CompletionItem(n) for n in _names(ctx, kind) if n.startswith(incomplete)]


def _one(c: Client, kind: str, ref: str, *, full: bool = False) -> Any:
    if kind == "checkpoints":
        name, version = split_ref(ref)
        return c.get(name, version, tensors=full)
    if kind == "jobs":
        return c.job(ref)
    for x in _list(c, kind, 0):  # agents, instances: no call gets one
        if ref_of(kind, x) == ref:
            return x
    raise NotFound(f"no {kind[:-1]} {ref!r}")


def _list(c: Client, kind: str, limit: int, name: str = "") -> list[Any]:
    if kind == "checkpoints":
        return c.checkpoints(name)
    if kind == "jobs":
        return c.jobs(limit)
    return c.agents() if kind == "agents" else c.instances()


def _fetcher(c: Client, kind: str, name: str, limit: int) -> Callable[[], list[Any]]:
    """What `get KIND [NAME]` shows: one object, or a list (a checkpoint NAME: its versions)."""
    if name and (kind != "checkpoints" or "@" in name):
        return lambda: [_one(c, kind, name)]
    return lambda: _list(c, kind, limit, name)


@command("get", short_help="list resources, or one")
@click.argument("kind", type=Kind(("checkpoints", "jobs", "agents", "instances", "all")))
@click.argument("name", required=False, default="", shell_complete=complete_ref)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="jobs: the newest N")  # fmt: skip
@click.option("-w", "--watch", "follow", is_flag=True,
              help="then print each row that changes, until Ctrl-C")  # fmt: skip
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="--watch: seconds between looks")  # fmt: skip
@with_client
def get(c: Client, kind: str, name: str, limit: int, follow: bool, interval: float) -> int:
    """List KIND (checkpoints, jobs, agents, instances, all), or the one named: a checkpoint
    NAME (its versions) or NAME@VERSION, a job id, an agent's node id, an instance name."""
    if kind == "all":
        if follow:
            raise click.UsageError("--watch needs one kind, not all")
        return _overview(c)
    if follow:
        return watch_list(_fetcher(c, kind, name, limit), kind, output(), interval)
    items = _fetcher(c, kind, name, limit)()
    if name and not items:
        raise NotFound(f"no checkpoint {name!r}")
    if name and structured():
        show(items[0])
    else:
        show_list(kind, items)
    return 0


ALL_KINDS = Kind(("checkpoints", "jobs", "agents", "instances"))


@command("describe", short_help="one resource with every field")
@click.argument("kind", type=ALL_KINDS)
@click.argument("name", shell_complete=complete_ref)
@with_client
def describe(c: Client, kind: str, name: str) -> int:
    """Show one resource in full: a checkpoint version with its tensors (NAME@VERSION, or
    NAME: the newest), a job with each rank's result, an agent, an instance."""
    show(_one(c, kind, name, full=True))
    return 0


@command("delete", short_help="delete a checkpoint version, an instance or an agent")
@click.argument("kind", type=Kind(("checkpoints", "instances", "agents")))
@click.argument("name", shell_complete=complete_ref)
@click.option("--force", is_flag=True, help="agents: also one that is attached")
@with_client
def delete(c: Client, kind: str, name: str, force: bool) -> int:
    """Delete a checkpoint (NAME@VERSION, or NAME: every version), forget an instance, or
    forget an agent (a detached one; --force: also an attached one)."""
    if kind == "checkpoints":
        ref = split_ref(name)
        deleted = c.delete(*ref)
        show(deleted, "\n".join(f"deleted checkpoint {d.name}@{d.version}" for d in deleted))
    elif kind == "instances":
        show(c.remove_instance(name), f"deleted instance {name}")
    else:
        show(c.remove_agent(name, force=force), f"deleted agent {name}")
    return 0


def _job_id(args: tuple[str, ...]) -> str:
    """JOB or `job JOB` (kubectl's form)."""
    if len(args) == 2 and ALIASES.get(args[0].lower()) == "jobs":
        return args[1]
    if len(args) == 1:
        return args[0]
    raise click.UsageError("want a job id: JOB or `job JOB`")


@command("cancel", short_help="cancel a running job (its engines go back)")
@click.argument("job", nargs=-1, required=True, shell_complete=complete_ref)
@with_client
def cancel(c: Client, job: tuple[str, ...]) -> int:
    """Cancel a pending or running job: engines it touched go back to what they served."""
    j = c.cancel(_job_id(job))
    show(j, f"cancelling job {j.id}")
    return 0


@command("watch", short_help="follow a job until it ends, or watch a list")
@click.argument("what", nargs=-1, required=True, shell_complete=complete_ref)
@click.option("--timeout", type=click.FloatRange(min=0), default=0.0,
              help="a job: seconds to follow it (default 1 h)")  # fmt: skip
@with_client
def watch(c: Client, what: tuple[str, ...], timeout: float) -> int:
    """JOB (or `job JOB`): follow it with a progress bar; exit 0 if it succeeds, 1 if not.
    KIND [NAME] (checkpoints, agents, instances, jobs): as `get KIND [NAME] --watch`."""
    kind = ALIASES.get(what[0].lower())
    if kind is not None and kind != "all" and (kind != "jobs" or len(what) == 1):
        fetch = _fetcher(c, kind, what[1] if len(what) > 1 else "", 20)
        return watch_list(fetch, kind, output(), 1.0)
    return wait_and_report(c, c.job(_job_id(what)), timeout or 3600.0 + WAIT_MARGIN_S)


def _overview(c: Client) -> int:
    every = {"agents": c.agents(), "checkpoints": c.checkpoints(),
             "instances": c.instances(), "jobs": c.jobs(10)}  # fmt: skip
    if structured():
        show(every)
        return 0
    for i, (kind, items) in enumerate(every.items()):
        if i:
            click.echo()
        click.echo(f"# {kind}")
        show_list(kind, items)
    return 0


@command("status", short_help="agents, checkpoints, instances and recent jobs")
@with_client
def status(c: Client) -> int:
    """Everything at a glance (`get all`)."""
    return _overview(c)


@command("health", short_help="whether ckptd serves (for probes)")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="seconds to wait for the answer")  # fmt: skip
def health(timeout: float) -> int:
    """Ask ckptd's grpc.health.v1 service over the same connection (TLS, mTLS) the other
    commands use: exit 0 when SERVING, 3 otherwise. For exec probes where the kubelet's
    own gRPC probe cannot speak TLS."""
    with connect(timeout_s=timeout) as c:
        serving = c.healthy()
    click.echo("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 3


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell completion script: `source <(ckptctl completion bash)`."""
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "ckptctl", "_CKPTCTL_COMPLETE").source())
    return 0
