"""ckptctl: the operator CLI on ckptd's gRPC API.

`-o table|json|yaml` anywhere on the line (JSON/YAML carry every field, 64-bit integers as
numbers). Exit codes: 0 done, 1 a job failed (or was cancelled), 2 usage, 3 the server
refused or could not be reached (its gRPC status and reason on stderr). Waiting on a job
(`--wait`, `watch`) has its own deadline (`--wait-timeout`), longer than the job's own, so a
failed job is reported with its reason; Ctrl-C stops waiting, not the job, and says how to
cancel it."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.credentials import Credentials
from ckpt_common.errors import CkptError
from ckpt_common.ranks import format_ranks, parse_ranks
from ckptctl.client import DEFAULT_ADDR, TERMINAL, Client
from ckptctl.output import render
from ckptctl.probes import load_probe

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130
WAIT_MARGIN_S = 120.0  # a wait outlives the job's own deadline by this much
FORMATS = ("table", "json", "yaml")


def _structured(out: str) -> bool:
    return out in ("json", "yaml")


def _enum(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(lines)


_OUT = {"fmt": "table"}


def _render(x: Any) -> str:
    return render(x, _OUT["fmt"])


_COLORS = {"SUCCEEDED": "32", "FAILED": "31", "CANCELLED": "33", "RUNNING": "36"}


def _colored(state: str, stream: Any) -> str:
    code = _COLORS.get(state)
    return f"\x1b[{code}m{state}\x1b[0m" if code and stream.isatty() else state


def _progress(j: tpb.Job) -> str:
    """Bytes delivered, rate and time left of a running job (from its buckets)."""
    if j.state != tpb.JOB_RUNNING or not j.started_unix or not j.buckets_total:
        return ""
    done = j.bytes_total * j.buckets_done // j.buckets_total
    spent = max(1e-3, time.time() - j.started_unix)
    rate = done / spent
    eta = (j.bytes_total - done) / rate if rate else 0.0
    return f"  {_size(done)}/{_size(j.bytes_total)} {rate / 1e9:.2f} GB/s" + (
        f" ETA {eta:.1f}s" if done else ""
    )


def _job_line(j: tpb.Job, stream: Any = sys.stdout) -> str:
    state = _colored(_enum(tpb.JobState, j.state, "JOB_"), stream)
    took = (j.finished_unix - j.started_unix) if j.finished_unix and j.started_unix else 0
    gbps = j.bytes_total / took / 1e9 if took else 0
    extra = f"  {took:.3f}s {gbps:.2f} GB/s" if took else _progress(j)
    reason = f"  reason: {j.reason}" if j.reason else ""
    return (
        f"job {j.id} {state} {j.checkpoint}@{j.version} ranks {format_ranks(list(j.ranks))} "
        f"buckets {j.buckets_done}/{j.buckets_total} ({_size(j.bytes_total)}){extra}{reason}"
    )


def _print_jobs(jobs: list[tpb.Job], out: str) -> None:
    if _structured(out):
        print(_render(jobs))
        return
    rows = []
    for j in jobs:
        took = (j.finished_unix - j.started_unix) if j.finished_unix and j.started_unix else 0
        rows.append(
            [
                j.id,
                _enum(tpb.JobKind, j.kind, "JOB_"),
                _enum(tpb.JobState, j.state, "JOB_"),
                f"{j.checkpoint}@{j.version}",
                format_ranks(list(j.ranks)) if j.ranks else "-",
                f"{j.buckets_done}/{j.buckets_total}",
                _size(j.bytes_total),
                f"{took:.3f}s" if took else "-",
                j.reason[:60],
            ]
        )
    print(
        _table(
            rows,
            ["ID", "KIND", "STATE", "CHECKPOINT", "RANKS", "BUCKETS", "BYTES", "TIME", "REASON"],
        )
    )


def _wait(c: Client, job: tpb.Job, out: str, timeout_s: float) -> int:
    """Follows a job to its end (or timeout_s); 0 if it succeeded, 1 if not."""
    tty = sys.stderr.isatty()
    last = job
    try:
        for last in c.watch(job.id, timeout_s):
            if not _structured(out):
                line = _job_line(last, sys.stderr)
                end = "" if tty else "\n"
                print(("\r" + line) if tty else line, end=end, file=sys.stderr, flush=True)
            if last.state in TERMINAL:
                break
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: job {job.id} keeps running; `ckptctl watch {job.id}` follows it, "
            f"`ckptctl cancel {job.id}` stops it",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_INTERRUPTED) from None
    if not _structured(out) and tty:
        print(file=sys.stderr)
    if last.state not in TERMINAL:
        last = c.job(job.id)
    if _structured(out):
        print(_render(last))
    elif last.state == tpb.JOB_SUCCEEDED:
        print(_job_line(last))
    if last.state in TERMINAL and last.state != tpb.JOB_SUCCEEDED:
        kind = _enum(tpb.JobKind, last.kind, "JOB_").lower()
        state = _enum(tpb.JobState, last.state, "JOB_").lower()
        print(f"error: {kind} job {last.id} {state}: {last.reason}", file=sys.stderr)
        return EXIT_FAILED
    if last.state != tpb.JOB_SUCCEEDED:
        print(f"error: job {last.id} still running after {timeout_s:.0f}s of waiting "
              f"(`ckptctl watch {last.id}` goes on)", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED
    return 0


def _wait_s(a: argparse.Namespace) -> float:
    """The client's wait: its own flag, else past the job's own deadline."""
    if getattr(a, "wait_timeout", 0):
        return float(a.wait_timeout)
    return (getattr(a, "timeout", 0) or 3600.0) + WAIT_MARGIN_S


def cmd_push(c: Client, a: argparse.Namespace) -> int:
    ranks = parse_ranks(a.ranks) if a.ranks else []
    t0 = time.monotonic()
    cp = c.push(
        a.name,
        a.version,
        a.paths,
        node_id=a.node,
        ranks=ranks,
        wait=not a.no_wait,
        timeout_s=a.timeout,
        replicas=a.replicas,
        probe=load_probe(a.probe) if a.probe else None,
    )
    if _structured(a.output):
        print(_render(cp))
    else:
        print(
            f"{cp.name}@{cp.version} {_enum(tpb.CheckpointState, cp.state, 'CHECKPOINT_')} "
            f"{cp.tensor_count} tensors, {_size(cp.total_bytes)} on {len(cp.shards)} ranks "
            f"in {time.monotonic() - t0:.2f}s"
        )
    return 0


def _split_ref(ref: str) -> tuple[str, int]:
    name, _, ver = ref.partition("@")
    if ver and not ver.isdigit():
        raise ValueError(f"bad version in {ref!r}: want NAME or NAME@VERSION")
    return name, int(ver or 0)


def cmd_update(c: Client, a: argparse.Namespace) -> int:
    name, version = _split_ref(a.checkpoint)
    ranks = parse_ranks(a.ranks) if a.ranks else []
    instances = a.instances.split(",") if a.instances else []
    method = {
        "auto": tpb.UPDATE_METHOD_UNSPECIFIED,
        "broadcast": tpb.UPDATE_BROADCAST,
        "sharded": tpb.UPDATE_SHARDED,
        "p2p": tpb.UPDATE_P2P,
    }[a.method]
    job = c.update(
        name,
        version,
        ranks=ranks,
        instances=instances,
        tensors=a.tensors.split(",") if a.tensors else [],
        bucket_bytes=a.bucket_mib << 20,
        timeout_s=a.timeout,
        method=method,
    )
    if not a.wait:
        print(_render(job) if _structured(a.output) else _job_line(job))
        return 0
    return _wait(c, job, a.output, _wait_s(a))


def cmd_checkpoints(c: Client, a: argparse.Namespace) -> int:
    cps = c.checkpoints(a.name or "")
    if _structured(a.output):
        print(_render(cps))
        return 0
    rows = [
        [
            cp.name,
            str(cp.version),
            _enum(tpb.CheckpointState, cp.state, "CHECKPOINT_"),
            str(cp.tensor_count),
            _size(cp.total_bytes),
            format_ranks([s.rank for s in cp.shards if s.rank >= 0]) or "-",
            cp.reason[:60],
        ]
        for cp in cps
    ]
    print(_table(rows, ["NAME", "VERSION", "STATE", "TENSORS", "BYTES", "RANKS", "REASON"]))
    return 0


def cmd_delete(c: Client, a: argparse.Namespace) -> int:
    name, version = _split_ref(a.checkpoint)
    deleted = c.delete(name, version)
    if _structured(a.output):
        print(_render(deleted))
    else:
        for cp in deleted:
            print(f"deleted {cp.name}@{cp.version}")
    return 0


def cmd_agents(c: Client, a: argparse.Namespace) -> int:
    if getattr(a, "action", "list") == "remove":
        if not a.node:
            raise ValueError("ckptctl agents remove NODE [--force]")
        removed = c.remove_agent(a.node, force=a.force)
        print(_render(removed) if _structured(a.output) else f"removed agent {removed.node_id}")
        return 0
    agents = c.agents()
    if _structured(a.output):
        print(_render(agents))
        return 0
    rows = []
    for ag in agents:
        for d in ag.devices:
            rows.append(
                [
                    str(d.rank) if d.rank >= 0 else "-",
                    ag.node_id,
                    str(d.index),
                    d.kind,
                    _enum(tpb.AgentState, ag.state, "AGENT_"),
                    ag.host,
                    _size(d.free_bytes),
                    d.uuid,
                ]
            )
    print("global rank order: agents by node id, then device index")
    print(_table(rows, ["RANK", "NODE", "DEVICE", "KIND", "STATE", "HOST", "FREE", "UUID"]))
    return 0


def cmd_instances(c: Client, a: argparse.Namespace) -> int:
    insts = c.instances()
    if _structured(a.output):
        print(_render(insts))
        return 0
    rows = [
        [
            i.name,
            _enum(tpb.InstanceKind, i.kind, "INSTANCE_"),
            i.endpoint or "-",
            str(i.tp_size),
            format_ranks([r for r in i.global_ranks if r >= 0]) or "-",
            f"{i.checkpoint}@{i.version}" if i.checkpoint else "-",
            "yes" if i.ready else "no",
            i.reason[:60],
        ]
        for i in insts
    ]
    print(_table(rows, ["NAME", "KIND", "ENDPOINT", "TP", "RANKS", "SERVES", "READY", "REASON"]))
    return 0


def _instance_from_args(a: argparse.Namespace) -> tpb.Instance:
    ranks = []
    for item in a.devices.split(","):
        node, _, dev = item.rpartition("/")
        if not node or not dev.isdigit():
            raise ValueError(f"bad device {item!r}: want NODE/INDEX")
        ranks.append(tpb.InstanceRank(node_id=node, device=int(dev)))
    kind = tpb.INSTANCE_RECEIVER if a.kind == "receiver" else tpb.INSTANCE_VLLM
    return tpb.Instance(
        name=a.name,
        kind=kind,
        endpoint=a.endpoint or "",
        tp_size=a.tp or len(ranks),
        ranks=ranks,
        weight_transfer=a.weight_transfer,
    )


def cmd_register(c: Client, a: argparse.Namespace) -> int:
    inst = c.register_instance(_instance_from_args(a))
    print(
        _render(inst)
        if _structured(a.output)
        else f"registered {inst.name} on ranks {format_ranks(list(inst.global_ranks))}"
    )
    return 0


def cmd_remove(c: Client, a: argparse.Namespace) -> int:
    inst = c.remove_instance(a.name)
    print(_render(inst) if _structured(a.output) else f"removed {inst.name}")
    return 0


def cmd_join(c: Client, a: argparse.Namespace) -> int:
    name, version = _split_ref(a.checkpoint) if a.checkpoint else ("", 0)
    job = c.join(_instance_from_args(a), name, version, timeout_s=a.timeout)
    if a.wait:
        return _wait(c, job, a.output, _wait_s(a))
    print(_render(job) if _structured(a.output) else _job_line(job))
    return 0


def cmd_jobs(c: Client, a: argparse.Namespace) -> int:
    _print_jobs(c.jobs(a.limit), a.output)
    return 0


def cmd_status(c: Client, a: argparse.Namespace) -> int:
    if a.job:
        j = c.job(a.job)
        print(_render(j) if _structured(a.output) else _job_line(j))
        return 0
    if _structured(a.output):
        every = {"agents": c.agents(), "checkpoints": c.checkpoints(),
                 "instances": c.instances(), "jobs": c.jobs(10)}  # fmt: skip
        print(_render(every))
        return 0
    for fn in (cmd_agents, cmd_checkpoints, cmd_instances, cmd_jobs):
        a.name, a.limit = "", 10
        fn(c, a)
        print()
    return 0


def cmd_watch(c: Client, a: argparse.Namespace) -> int:
    return _wait(c, c.job(a.job), a.output, a.timeout or 3600.0 + WAIT_MARGIN_S)


def cmd_cancel(c: Client, a: argparse.Namespace) -> int:
    j = c.cancel(a.job)
    print(_render(j) if _structured(a.output) else f"cancelling job {j.id}")
    return 0


def cmd_describe(c: Client, a: argparse.Namespace) -> int:
    """One object in full: a checkpoint version (with its tensors) or a job."""
    if a.kind == "job":
        obj: Any = c.job(a.ref)
    else:
        name, version = _split_ref(a.ref)
        obj = c.get(name, version, tensors=True)
    print(_render(obj) if _structured(a.output) else render(obj, "yaml"))
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ckptd")
    except Exception:
        return "unknown"


GLOBALS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("--addr",), {"default": DEFAULT_ADDR, "help": "ckptd host:port (env CKPTD_ADDR)"}),
    (("-o", "--output"), {"choices": FORMATS, "default": "table",
                          "help": "table, or every field as json or yaml"}),
    (("--token-file",), {"default": "", "help": "bearer token (env CKPTD_TOKEN_FILE)"}),
    (("--tls-ca",), {"default": "", "help": "CA that signed ckptd's certificate"}),
    (("--tls-cert",), {"default": "", "help": "client certificate (mTLS)"}),
    (("--tls-key",), {"default": "", "help": "its private key"}),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """Global options go anywhere on the line: before the subcommand or after it."""
    common = argparse.ArgumentParser(add_help=False)
    p = argparse.ArgumentParser(prog="ckptctl", description="operate ckptd")
    p.add_argument("--version", action="version", version=f"ckptctl {_version()}")
    for flags, kw in GLOBALS:
        p.add_argument(*flags, **kw)
        common.add_argument(*flags, **{**kw, "default": argparse.SUPPRESS})
    sub = p.add_subparsers(dest="cmd", required=True)
    _add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    s = sub.add_parser("push", help="push a checkpoint version from safetensors files")
    s.add_argument("name")
    s.add_argument("version", type=int)
    s.add_argument("paths", nargs="+", help="files or directories (model.safetensors.index.json)")
    s.add_argument("--node", default="", help="the files are on this node only")
    s.add_argument("--ranks", default="", help="ranks that hold the bytes (default all)")
    s.add_argument("--no-wait", action="store_true", help="return once the push is accepted")
    s.add_argument(
        "--replicas",
        type=int,
        default=1,
        choices=[1, 2],
        help="2: mirror every shard on another rank (another node if any)",
    )
    s.add_argument(
        "--probe",
        default="",
        help="JSON file: {prompt, expected[, logprobs, tolerance]} token ids each engine must"
        " answer before it serves this version",
    )
    s.add_argument("--timeout", type=float, default=600.0, help="seconds the push may take")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("update", help="broadcast a checkpoint into running engines")
    s.add_argument("checkpoint", help="NAME or NAME@VERSION (default: newest ready)")
    s.add_argument("--ranks", default="", help="e.g. 0-3,6")
    s.add_argument("--instances", default="", help="comma-separated instance names")
    s.add_argument("--tensors", default="", help="partial update: names or prefixes")
    s.add_argument(
        "--method",
        choices=["auto", "broadcast", "sharded", "p2p"],
        default="auto",
        help="auto: each rank receives only what it keeps once its engine reported its "
        "sharding (sharded: or fail), else everything (broadcast)",
    )
    s.add_argument("--bucket-mib", type=int, default=0, help="bucket size (0: ckptd chooses)")
    s.add_argument(
        "--timeout", type=float, default=0.0, help="the job's deadline in seconds (0: ckptd's)"
    )
    s.add_argument("--wait", action="store_true", help="follow progress until it ends")
    s.add_argument(
        "--wait-timeout", type=float, default=0.0,
        help="how long --wait waits (default: the job's deadline + 120 s)",
    )  # fmt: skip
    s.set_defaults(fn=cmd_update)

    s = sub.add_parser("checkpoints", help="list checkpoints")
    s.add_argument("name", nargs="?", default="")
    s.set_defaults(fn=cmd_checkpoints)

    s = sub.add_parser("delete", help="delete a checkpoint (NAME: every version)")
    s.add_argument("checkpoint")
    s.set_defaults(fn=cmd_delete)

    s = sub.add_parser("agents", help="list agents, devices and global ranks; or remove one")
    s.add_argument("action", nargs="?", choices=["list", "remove"], default="list")
    s.add_argument("node", nargs="?", default="", help="remove: the agent's node id")
    s.add_argument("--force", action="store_true", help="remove: also an attached agent")
    s.set_defaults(fn=cmd_agents)

    s = sub.add_parser("instances", help="list inference instances")
    s.set_defaults(fn=cmd_instances)

    for name, fn, helptext in (
        ("register", cmd_register, "register an inference instance"),
        ("join", cmd_join, "bring a new instance to the fleet version"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("name")
        s.add_argument("--devices", required=True, help="NODE/INDEX,... in engine rank order")
        s.add_argument("--endpoint", default="", help="http://host:port of a vLLM server")
        s.add_argument("--kind", choices=["vllm", "receiver"], default="vllm")
        s.add_argument("--tp", type=int, default=0, help="TP size (default: the devices)")
        s.add_argument(
            "--weight-transfer",
            choices=["extension", "ckptd"],
            default="extension",
            help="ckptd: the engine runs vLLM's native weight-transfer API with "
            '--weight-transfer-config \'{"backend": "ckptd"}\'',
        )
        if name == "join":
            s.add_argument("--checkpoint", default="", help="NAME@VERSION (default: the fleet's)")
            s.add_argument("--timeout", type=float, default=0.0, help="the job's deadline (s)")
            s.add_argument("--wait", action="store_true", help="follow it until it ends")
            s.add_argument("--wait-timeout", type=float, default=0.0, help="how long --wait waits")
        s.set_defaults(fn=fn)

    s = sub.add_parser("remove", help="forget an instance")
    s.add_argument("name")
    s.set_defaults(fn=cmd_remove)

    s = sub.add_parser("jobs", help="list recent jobs")
    s.add_argument("--limit", type=int, default=20, help="newest N jobs")
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("status", help="overview, or one job")
    s.add_argument("job", nargs="?", default="")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("watch", help="follow a job until it ends")
    s.add_argument("job")
    s.add_argument("--timeout", type=float, default=0.0, help="seconds to wait (default 1 h)")
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("cancel", help="cancel a running job (engines are restored)")
    s.add_argument("job")
    s.set_defaults(fn=cmd_cancel)

    s = sub.add_parser("describe", help="one checkpoint version (with its tensors) or job")
    s.add_argument("kind", choices=["checkpoint", "job"])
    s.add_argument("ref", help="NAME[@VERSION] or a job id")
    s.set_defaults(fn=cmd_describe)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _OUT["fmt"] = a.output
    try:
        creds = Credentials(
            token_file=a.token_file, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key
        )
        with Client(a.addr, credentials=creds) as c:
            return a.fn(c, a)
    except CkptError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as e:  # what was asked is malformed: a usage error
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
