"""ckptctl: the operator CLI on ckptd's gRPC API. `-o json` everywhere; non-zero exit with
the server's reason on failure."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.credentials import Credentials
from ckpt_common.errors import CkptError
from ckpt_common.ranks import format_ranks, parse_ranks
from ckptctl.client import DEFAULT_ADDR, TERMINAL, Client
from ckptctl.probes import load_probe

EXIT_FAILED = 1
EXIT_ERROR = 2


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


def _json(msgs: Any) -> str:
    if isinstance(msgs, list):
        return json.dumps(
            [MessageToDict(m, preserving_proto_field_name=True) for m in msgs], indent=2
        )
    return json.dumps(MessageToDict(msgs, preserving_proto_field_name=True), indent=2)


def _job_line(j: tpb.Job) -> str:
    state = _enum(tpb.JobState, j.state, "JOB_")
    took = (j.finished_unix - j.started_unix) if j.finished_unix and j.started_unix else 0
    gbps = j.bytes_total / took / 1e9 if took else 0
    extra = f"  {took:.3f}s {gbps:.2f} GB/s" if took else ""
    reason = f"  reason: {j.reason}" if j.reason else ""
    return (
        f"job {j.id} {state} {j.checkpoint}@{j.version} ranks {format_ranks(list(j.ranks))} "
        f"buckets {j.buckets_done}/{j.buckets_total} ({_size(j.bytes_total)}){extra}{reason}"
    )


def _print_jobs(jobs: list[tpb.Job], out: str) -> None:
    if out == "json":
        print(_json(jobs))
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
    tty = sys.stderr.isatty()
    last = job
    for last in c.watch(job.id, timeout_s):
        if out != "json":
            line = _job_line(last)
            print(
                ("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True
            )
        if last.state in TERMINAL:
            break
    if out != "json" and tty:
        print(file=sys.stderr)
    if out == "json":
        print(_json(last))
    elif last.state == tpb.JOB_SUCCEEDED:
        print(_job_line(last))
    return 0 if last.state == tpb.JOB_SUCCEEDED else EXIT_FAILED


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
    if a.output == "json":
        print(_json(cp))
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
        raise SystemExit(f"bad version in {ref!r}")
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
        print(_json(job) if a.output == "json" else _job_line(job))
        return 0
    rc = _wait(c, job, a.output, a.timeout or 3600)
    if rc:
        final = c.job(job.id)
        print(f"error: update failed: {final.reason}", file=sys.stderr)
    return rc


def cmd_checkpoints(c: Client, a: argparse.Namespace) -> int:
    cps = c.checkpoints(a.name or "")
    if a.output == "json":
        print(_json(cps))
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
    if a.output == "json":
        print(_json(deleted))
    else:
        for cp in deleted:
            print(f"deleted {cp.name}@{cp.version}")
    return 0


def cmd_agents(c: Client, a: argparse.Namespace) -> int:
    if getattr(a, "action", "list") == "remove":
        if not a.node:
            raise ValueError("ckptctl agents remove NODE [--force]")
        removed = c.remove_agent(a.node, force=a.force)
        print(_json(removed) if a.output == "json" else f"removed agent {removed.node_id}")
        return 0
    agents = c.agents()
    if a.output == "json":
        print(_json(agents))
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
    if a.output == "json":
        print(_json(insts))
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
            raise SystemExit(f"bad device {item!r}: want NODE/INDEX")
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
        _json(inst)
        if a.output == "json"
        else f"registered {inst.name} on ranks {format_ranks(list(inst.global_ranks))}"
    )
    return 0


def cmd_remove(c: Client, a: argparse.Namespace) -> int:
    inst = c.remove_instance(a.name)
    print(_json(inst) if a.output == "json" else f"removed {inst.name}")
    return 0


def cmd_join(c: Client, a: argparse.Namespace) -> int:
    name, version = _split_ref(a.checkpoint) if a.checkpoint else ("", 0)
    job = c.join(_instance_from_args(a), name, version, timeout_s=a.timeout)
    return _wait(c, job, a.output, a.timeout or 3600) if a.wait else (print(_job_line(job)) or 0)


def cmd_jobs(c: Client, a: argparse.Namespace) -> int:
    _print_jobs(c.jobs(a.limit), a.output)
    return 0


def cmd_status(c: Client, a: argparse.Namespace) -> int:
    if a.job:
        j = c.job(a.job)
        print(_json(j) if a.output == "json" else _job_line(j))
        return 0
    if a.output == "json":
        print(
            json.dumps(
                {
                    "agents": [
                        MessageToDict(x, preserving_proto_field_name=True) for x in c.agents()
                    ],
                    "checkpoints": [
                        MessageToDict(x, preserving_proto_field_name=True) for x in c.checkpoints()
                    ],
                    "instances": [
                        MessageToDict(x, preserving_proto_field_name=True) for x in c.instances()
                    ],
                    "jobs": [
                        MessageToDict(x, preserving_proto_field_name=True) for x in c.jobs(10)
                    ],
                },
                indent=2,
            )
        )
        return 0
    for fn in (cmd_agents, cmd_checkpoints, cmd_instances, cmd_jobs):
        a.name, a.limit = "", 10
        fn(c, a)
        print()
    return 0


def cmd_watch(c: Client, a: argparse.Namespace) -> int:
    return _wait(c, c.job(a.job), a.output, a.timeout or 3600)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckptctl", description="operate ckptd")
    p.add_argument("--addr", default=DEFAULT_ADDR, help="ckptd host:port (env CKPTD_ADDR)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--token-file", default="", help="bearer token (env CKPTD_TOKEN_FILE)")
    p.add_argument("--tls-ca", default="", help="CA that signed ckptd's certificate")
    p.add_argument("--tls-cert", default="", help="client certificate (mTLS)")
    p.add_argument("--tls-key", default="", help="its private key")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("push", help="push a checkpoint version from safetensors files")
    s.add_argument("name")
    s.add_argument("version", type=int)
    s.add_argument("paths", nargs="+", help="files or directories (model.safetensors.index.json)")
    s.add_argument("--node", default="", help="the files are on this node only")
    s.add_argument("--ranks", default="", help="ranks that hold the bytes (default all)")
    s.add_argument("--no-wait", action="store_true")
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
    s.add_argument("--timeout", type=float, default=600.0)
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
    s.add_argument("--bucket-mib", type=int, default=0)
    s.add_argument("--timeout", type=float, default=0.0)
    s.add_argument("--wait", action="store_true", help="follow progress until it ends")
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
        s.add_argument("--tp", type=int, default=0)
        s.add_argument(
            "--weight-transfer",
            choices=["extension", "ckptd"],
            default="extension",
            help="ckptd: the engine runs vLLM's native weight-transfer API with "
            '--weight-transfer-config \'{"backend": "ckptd"}\'',
        )
        if name == "join":
            s.add_argument("--checkpoint", default="")
            s.add_argument("--timeout", type=float, default=0.0)
            s.add_argument("--wait", action="store_true")
        s.set_defaults(fn=fn)

    s = sub.add_parser("remove", help="forget an instance")
    s.add_argument("name")
    s.set_defaults(fn=cmd_remove)

    s = sub.add_parser("jobs", help="list recent jobs")
    s.add_argument("--limit", type=int, default=20)
    s.set_defaults(fn=cmd_jobs)

    s = sub.add_parser("status", help="overview, or one job")
    s.add_argument("job", nargs="?", default="")
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("watch", help="follow a job until it ends")
    s.add_argument("job")
    s.add_argument("--timeout", type=float, default=0.0)
    s.set_defaults(fn=cmd_watch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        creds = Credentials(
            token_file=a.token_file, tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key
        )
        with Client(a.addr, credentials=creds) as c:
            return a.fn(c, a)
    except CkptError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
