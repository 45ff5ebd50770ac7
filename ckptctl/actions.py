"""The commands that change the fleet: push a version, update engines, register and join
instances. A wait (push by default, `--wait` on update and join) shows progress; its own
deadline (`--wait-timeout`) outlives the job's, so a failed job is reported with its
reason, never with the client's timeout."""

from __future__ import annotations

import time
from typing import Any

import click

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.client import TERMINAL, Client
from ckpt_client.probes import load_probe
from ckpt_common.ranks import format_ranks, parse_ranks
from ckptctl.app import command, show, structured, with_client
from ckptctl.progress import follow_job, follow_push
from ckptctl.term import size
from ckptctl.views import enum_name, job_line

EXIT_FAILED = 1
WAIT_MARGIN_S = 120.0  # a wait outlives the job's own deadline by this much
METHODS = {
    "auto": tpb.UPDATE_METHOD_UNSPECIFIED,
    "broadcast": tpb.UPDATE_BROADCAST,
    "sharded": tpb.UPDATE_SHARDED,
    "p2p": tpb.UPDATE_P2P,
    "delta": tpb.UPDATE_DELTA,
}


def split_ref(ref: str) -> tuple[str, int]:
    """NAME or NAME@VERSION (0: the newest)."""
    name, _, ver = ref.partition("@")
    if not name or (ver and not ver.isdigit()):
        raise click.BadParameter(f"{ref!r}: want NAME or NAME@VERSION")
    return name, int(ver or 0)


def _ranks(text: str) -> list[int]:
    try:
        return parse_ranks(text) if text else []
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--ranks'") from None


def wait_and_report(c: Client, job: tpb.Job, wait_s: float) -> int:
    """Follows job to its end: 0 if it succeeded, 1 if not (its reason on stderr)."""
    last = follow_job(c, job, wait_s, show=not structured())
    if structured() or last.state == tpb.JOB_SUCCEEDED:
        show(last, job_line(last))
    if last.state == tpb.JOB_SUCCEEDED:
        return 0
    if last.state in TERMINAL:
        kind = enum_name(tpb.JobKind, last.kind, "JOB_").lower()
        state = enum_name(tpb.JobState, last.state, "JOB_").lower()
        click.echo(f"error: {kind} job {last.id} {state}: {last.reason}", err=True)
    else:
        click.echo(f"error: job {last.id} still running after {wait_s:.0f}s of waiting "
                   f"(`ckptctl watch {last.id}` goes on)", err=True)  # fmt: skip
    return EXIT_FAILED


def wait_s(wait_timeout: float, job_timeout: float) -> float:
    """The client's wait: its own flag, else past the job's own deadline."""
    return wait_timeout or (job_timeout or 3600.0) + WAIT_MARGIN_S


def job_options(f: Any) -> Any:
    """--timeout (the job's), --wait and --wait-timeout (the client's), for a command that
    starts a job."""
    opts = [
        click.option("--timeout", type=click.FloatRange(min=0), default=0.0,
                     help="the job's deadline in seconds (0: ckptd's)"),
        click.option("--wait", is_flag=True, help="follow it with a progress bar until it ends"),
        click.option("--wait-timeout", type=click.FloatRange(min=0), default=0.0,
                     help="how long --wait waits (default: the job's deadline + 120 s)"),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


def started(c: Client, job: tpb.Job, wait: bool, wait_timeout: float, timeout: float) -> int:
    """A job just started: shown as it is, or followed to its end (--wait)."""
    if not wait:
        show(job, job_line(job))
        return 0
    return wait_and_report(c, job, wait_s(wait_timeout, timeout))


@command("push", short_help="push a checkpoint version from safetensors files")
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--node", default="", help="the files are on this node only")
@click.option("--ranks", default="", help="ranks that hold the bytes, e.g. 0-3,6 (default all)")
@click.option("--no-wait", is_flag=True, help="return once the push is accepted")
@click.option("--replicas", type=click.IntRange(1, 2), default=1,
              help="2: mirror every shard on another rank (another node if any)")  # fmt: skip
@click.option("--probe", default="", type=click.Path(dir_okay=False),
              help="JSON file: {prompt, expected[, logprobs, tolerance]} token ids each engine "
                   "must answer before it serves this version")  # fmt: skip
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="seconds the push may take")  # fmt: skip
@with_client
def push(c: Client, name: str, version: int, paths: tuple[str, ...], node: str, ranks: str,
         no_wait: bool, replicas: int, probe: str, timeout: float) -> int:  # fmt: skip
    """Push version VERSION of checkpoint NAME: safetensors files, or directories with a
    model.safetensors.index.json (any Hugging Face model directory). The agents read the
    files (they must see the same paths) into their host stores; shows progress until the
    version is ready."""
    t0 = time.monotonic()

    def call() -> tpb.Checkpoint:
        return c.push(
            name, version, list(paths), node_id=node, ranks=_ranks(ranks), wait=not no_wait,
            timeout_s=timeout, replicas=replicas, probe=load_probe(probe) if probe else None,
        )  # fmt: skip

    cp = call() if no_wait else follow_push(c, name, version, call, show=not structured())
    state = enum_name(tpb.CheckpointState, cp.state, "CHECKPOINT_")
    show(cp, f"{cp.name}@{cp.version} {state} {cp.tensor_count} tensors, "
             f"{size(cp.total_bytes)} on {len(cp.shards)} ranks "
             f"in {time.monotonic() - t0:.2f}s")  # fmt: skip
    return 0


@command("update", short_help="load a checkpoint version into running engines")
@click.argument("checkpoint")
@click.option("--ranks", default="", help="global ranks, e.g. 0-3,6")
@click.option("--instances", default="", help="comma-separated instance names")
@click.option("--tensors", default="", help="partial update: comma-separated names or prefixes")
@click.option("--method", type=click.Choice(list(METHODS)), default="auto", show_default=True,
              help="auto: only what changed where every target serves an older version "
                   "ckptd has a delta from, else each rank receives only what it keeps once "
                   "its engine reported its sharding, else everything; delta / sharded: that "
                   "or fail; broadcast: everything; p2p: read the owners' host stores")  # fmt: skip
@click.option("--bucket-mib", type=click.IntRange(min=0), default=0,
              help="bucket size in MiB (0: ckptd chooses)")  # fmt: skip
@job_options
@with_client
def update(c: Client, checkpoint: str, ranks: str, instances: str, tensors: str, method: str,
           bucket_mib: int, timeout: float, wait: bool, wait_timeout: float) -> int:  # fmt: skip
    """Update engines to CHECKPOINT (NAME: its newest ready version, or NAME@VERSION): every
    rank, or the ranks or instances given. Engines that fail go back to what they served."""
    name, version = split_ref(checkpoint)
    job = c.update(
        name, version, ranks=_ranks(ranks),
        instances=[i for i in instances.split(",") if i],
        tensors=[t for t in tensors.split(",") if t],
        bucket_bytes=bucket_mib << 20, timeout_s=timeout, method=METHODS[method],
    )  # fmt: skip
    return started(c, job, wait, wait_timeout, timeout)


def _instance(name: str, devices: str, endpoint: str, kind: str, tp: int, wt: str) -> tpb.Instance:
    ranks = []
    for item in devices.split(","):
        node, _, dev = item.rpartition("/")
        if not node or not dev.isdigit():
            raise click.BadParameter(f"bad device {item!r}: want NODE/INDEX",
                                     param_hint="'--devices'")  # fmt: skip
        ranks.append(tpb.InstanceRank(node_id=node, device=int(dev)))
    return tpb.Instance(
        name=name,
        kind=tpb.INSTANCE_RECEIVER if kind == "receiver" else tpb.INSTANCE_VLLM,
        endpoint=endpoint,
        tp_size=tp or len(ranks),
        ranks=ranks,
        weight_transfer=wt,
    )


def instance_options(f: Any) -> Any:
    opts = [
        click.argument("name"),
        click.option("--devices", required=True, help="NODE/INDEX,... in engine rank order"),
        click.option("--endpoint", default="", help="http://host:port of a vLLM server"),
        click.option("--kind", type=click.Choice(["vllm", "receiver"]), default="vllm",
                     show_default=True, help="what serves: a vLLM server or ckpt-receiver"),
        click.option("--tp", type=click.IntRange(min=0), default=0,
                     help="tensor-parallel size (default: the number of devices)"),
        click.option("--weight-transfer", type=click.Choice(["extension", "ckptd"]),
                     default="extension", show_default=True,
                     help="ckptd: the engine runs vLLM's native weight-transfer API with "
                          '--weight-transfer-config \'{"backend": "ckptd"}\''),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


@command("register", short_help="register an inference instance")
@instance_options
@with_client
def register(c: Client, name: str, devices: str, endpoint: str, kind: str, tp: int,
             weight_transfer: str) -> int:  # fmt: skip
    """Register instance NAME (its engines on --devices) so updates can name it."""
    inst = c.register_instance(_instance(name, devices, endpoint, kind, tp, weight_transfer))
    show(inst, f"registered {inst.name} on ranks {format_ranks(list(inst.global_ranks))}")
    return 0


@command("join", short_help="bring a new instance to the fleet's version")
@instance_options
@click.option("--checkpoint", default="", help="NAME@VERSION (default: what the fleet serves)")
@job_options
@with_client
def join(c: Client, name: str, devices: str, endpoint: str, kind: str, tp: int,
         weight_transfer: str, checkpoint: str, timeout: float, wait: bool,
         wait_timeout: float) -> int:  # fmt: skip
    """Register instance NAME and load it from the peers' host stores (P2P), to what the
    fleet serves or --checkpoint."""
    ref = split_ref(checkpoint) if checkpoint else ("", 0)
    inst = _instance(name, devices, endpoint, kind, tp, weight_transfer)
    job = c.join(inst, ref[0], ref[1], timeout_s=timeout)
    return started(c, job, wait, wait_timeout, timeout)
