"""A typed client for ckptd. gRPC statuses come back as ckpt_common.errors exceptions.

Trainers push tensors from their own process with `push_tensors`: they are written as one
safetensors file per call (in /dev/shm by default, where the agents on this node read them)
and pushed by path.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import ckptd_pb2_grpc
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.credentials import Credentials, channel_args
from ckpt_common.errors import CkptError, DeadlineExceeded, error_for

DEFAULT_ADDR = os.environ.get("CKPTD_ADDR", "127.0.0.1:7601")
TERMINAL = (tpb.JOB_SUCCEEDED, tpb.JOB_FAILED, tpb.JOB_CANCELLED)


@dataclass(frozen=True, kw_only=True)
class PushTimes:
    """The phases of this client's last direct push part (seconds)."""

    begin_s: float  # BeginPush: placing, admitting, allocating (or reusing) the stores
    write_s: float  # mapping the segments and copying (and checksumming) into them
    commit_s: float  # CommitPush: every part in, checksums recorded, the version READY
    map_s: float  # of write_s: mapping and page-locking segments (0 once the ring is warm)
    copy_s: float  # of write_s: the copies and checksums
    bytes: int
    newly_pinned: int  # segments page-locked by this push
    trainer_checksums: bool  # sent with the commit (else the agents checksummed their stores)
    sum_s: float = 0.0  # a streamed push: the checksums, taken before BeginPush
    part_checksums: int = 0  # parts of tensors ckptd asked for (engines' layouts), summed here
    streamed: bool = False  # the update was submitted before the bytes were written


def _whole_shapes(items: Sequence[Any]) -> list[tuple[int, ...]]:
    """Each item's tensor shape where it is a whole tensor (ckptd asks for parts of those
    only), else () (a piece)."""
    return [tuple(it.shape) if it.piece is None else () for it in items]


class Client:
    """credentials (ckpt_common.credentials): a token and/or TLS; unset fields come from the
    environment (CKPTD_TOKEN_FILE, CKPTD_TLS_CA, ...), else ckptd's local admin token."""

    def __init__(
        self,
        addr: str = DEFAULT_ADDR,
        *,
        timeout_s: float = 30.0,
        credentials: Credentials | None = None,
    ) -> None:
        self.addr = addr
        self.timeout_s = timeout_s
        creds = (credentials or Credentials()).resolved()
        creds.check_transport(addr)
        self._metadata = creds.metadata()
        if creds.tls:
            self._channel = grpc.secure_channel(addr, creds.channel_credentials(), channel_args())
        else:
            self._channel = grpc.insecure_channel(addr, options=channel_args())
        self._stub = ckptd_pb2_grpc.CkptStub(self._channel)
        self._segments: Any = None  # ckpt_client.segments.SegmentCache, on the first direct push
        self._segments_lock = threading.Lock()
        self.last_push: PushTimes | None = None
        self.push_streams = 4  # CUDA streams per device a direct push copies GPU tensors on

    def close(self) -> None:
        """Closes the channel and releases the segments direct pushes mapped."""
        if self._segments is not None:
            self._segments.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, name: str, request: Any, timeout_s: float | None = None, stub: Any = None
    ) -> Any:
        try:
            return getattr(stub or self._stub, name)(
                request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise error_for(e.code().name, e.details() or str(e)) from None

    # trainers
    def push(
        self,
        name: str,
        version: int,
        paths: list[str],
        *,
        node_id: str = "",
        ranks: list[int] | None = None,
        wait: bool = True,
        timeout_s: float = 600.0,
        replicas: int = 1,
        probe: tpb.Probe | None = None,
    ) -> tpb.Checkpoint:
        """probe (ckpt_client.probes): what each engine must answer before it serves the
        version."""
        req = cpb.PushCheckpointRequest(
            name=name,
            version=version,
            ranks=ranks or [],
            wait=wait,
            timeout_s=timeout_s,
            replicas=replicas,
            sources=[tpb.Source(path=p, node_id=node_id) for p in paths],
            probe=probe,
        )
        return self._call("PushCheckpoint", req, timeout_s + 30)

    def push_tensors(
        self,
        name: str,
        version: int,
        tensors: Mapping[str, Any],
        *,
        directory: str = "/dev/shm",
        node_id: str = "",
        keep_file: bool = False,
        timeout_s: float = 600.0,
        probe: tpb.Probe | None = None,
    ) -> tpb.Checkpoint:
        """Pushes in-memory torch tensors (written once to a safetensors file the agents read).
        The file is staged in this user's own 0700 directory inside `directory`
        (`ckpt-stage-<uid>`: created, or refused if anyone else owns it or can write it)."""
        from ckpt_common.rendezvous import ensure_private_dir
        from ckptctl.st_writer import write_safetensors

        stage = ensure_private_dir(os.path.join(directory, f"ckpt-stage-{os.geteuid()}"))
        path = os.path.join(stage, f"ckpt-push-{name}-{version}-{os.getpid()}.safetensors")
        write_safetensors(dict(tensors), path)
        try:
            return self.push(
                name, version, [path], node_id=node_id, timeout_s=timeout_s, probe=probe
            )
        finally:
            if not keep_file:
                os.unlink(path)

    def push_direct(
        self,
        name: str,
        version: int,
        tensors: Mapping[str, Any],
        *,
        node_id: str,
        threads: int = 16,
        timeout_s: float = 600.0,
        probe: tpb.Probe | None = None,
        checksums: bool = True,
    ) -> tpb.Checkpoint:
        """Pushes in-memory torch tensors straight into the host stores of the agents on this
        node (node_id): no file, one parallel copy. The trainer must run on that node as the
        agent's user (it maps the agent's shared-memory segments)."""
        from ckpt_client.direct_push import whole

        return self.push_part(
            name, version, whole(tensors), node_id=node_id, threads=threads,
            timeout_s=timeout_s, probe=probe, checksums=checksums,
        )  # fmt: skip

    def push_part(
        self,
        name: str,
        version: int,
        items: Sequence[Any],
        *,
        node_id: str,
        part: int = 0,
        parts: int = 1,
        threads: int = 16,
        streams: int | None = None,
        timeout_s: float = 600.0,
        probe: tpb.Probe | None = None,
        checksums: bool = True,
    ) -> tpb.Checkpoint:
        """One part of a direct push (ckpt_client.direct_push.Item: tensors or pieces of them),
        written into this node's host stores. With parts > 1 every part calls this; it
        returns once all parts are committed and the version is READY.

        GPU tensors are copied over `streams` CUDA streams per device (default
        `self.push_streams`, 4) into segments this client keeps mapped and page-locked for
        the next push (`close` releases them); CPU tensors by `threads` threads. With
        checksums (the default) each item's checksum is computed here, from the trainer's
        own bytes, and sent with the commit: the agents do not read their stores again.
        What the push took is in `last_push`."""
        cp, _ = self._push(
            name, version, items, node_id=node_id, part=part, parts=parts, threads=threads,
            streams=streams, timeout_s=timeout_s, probe=probe, checksums=checksums,
        )  # fmt: skip
        return cp

    def push_streamed(
        self,
        name: str,
        version: int,
        tensors: Mapping[str, Any],
        *,
        node_id: str,
        instances: list[str],
        threads: int = 16,
        streams: int | None = None,
        timeout_s: float = 600.0,
        probe: tpb.Probe | None = None,
    ) -> tuple[tpb.Checkpoint, tpb.Job]:
        """A direct push whose update starts before its bytes are written: the checksums are
        taken first, where the bytes are (the GPU for GPU tensors), and declared at
        BeginPush; the update of `instances` is submitted streamed (UpdateRequest.stream);
        then the copies fill the stores in order, raising the progress marks the agents'
        workers follow, so each bucket flows on as soon as it has landed. Engines verify every
        tensor against the declared checksums and the job succeeds only once the push is
        committed. Returns the READY version and the job (submitted: `wait` for it). An
        update ckptd refuses is raised once the push is committed (the version stays)."""
        from ckpt_client.direct_push import whole

        cp, job = self._push(
            name, version, whole(tensors), node_id=node_id, threads=threads, streams=streams,
            timeout_s=timeout_s, probe=probe, checksums=True, stream_to=instances,
        )  # fmt: skip
        assert job is not None
        return cp, job

    def _push(
        self, name: str, version: int, items: Sequence[Any], *, node_id: str, part: int = 0,
        parts: int = 1, threads: int, streams: int | None, timeout_s: float,
        probe: tpb.Probe | None, checksums: bool, stream_to: list[str] | None = None,
    ) -> tuple[tpb.Checkpoint, tpb.Job | None]:  # fmt: skip
        """One part written and committed; stream_to: declare the checksums at BeginPush,
        submit the streamed update of those instances, then write in store order."""
        from ckpt_client.direct_push import item_checksums, tensor_metas, write_items

        t0 = time.monotonic()
        metas, flats = tensor_metas(items)
        ts = t0  # a streamed push: after its checksums (sum_s)
        if stream_to is not None:
            for m, c in zip(metas, item_checksums(flats, threads), strict=True):
                m.checksum = c
            ts = time.monotonic()
        req = cpb.BeginPushRequest(
            name=name, version=version, node_id=node_id, tensors=metas,
            timeout_s=timeout_s, probe=probe, part=part, parts=parts,
        )  # fmt: skip
        plan = self._call("BeginPush", req, timeout_s + 30)
        job, refused = None, None
        if stream_to is not None:
            try:
                job = self.update(name, version, instances=stream_to, stream=True)
            except CkptError as e:
                refused = e
        t1 = time.monotonic()
        sums, stats = write_items(
            plan, flats, self.segments, threads=threads, sums=checksums and stream_to is None,
            streams=streams or self.push_streams, shapes=_whole_shapes(items),
            marked=stream_to is not None,
        )  # fmt: skip
        t2 = time.monotonic()
        commit = cpb.CommitPushRequest(
            name=name, version=version, part=part, checksums=sums,
            part_checksums=stats.part_sums,
        )  # fmt: skip
        cp = self._call("CommitPush", commit, timeout_s + 30)
        self.last_push = PushTimes(
            begin_s=t1 - ts, write_s=t2 - t1, commit_s=time.monotonic() - t2,
            map_s=stats.map_s, copy_s=stats.copy_s, bytes=stats.bytes,
            newly_pinned=stats.newly_pinned, trainer_checksums=checksums,
            part_checksums=len(stats.part_sums), sum_s=ts - t0,
            streamed=job is not None,
        )  # fmt: skip
        if refused is not None:
            raise refused
        return cp, job

    @property
    def segments(self) -> Any:
        """The host-store segments this client has mapped (ckpt_client.segments.SegmentCache)."""
        with self._segments_lock:  # parts pushed from threads share one
            if self._segments is None:
                from ckpt_client.segments import SegmentCache

                self._segments = SegmentCache()
            return self._segments

    def pin_segments(self, node_id: str) -> int:
        """Maps and page-locks every host store the agent of node_id (this node) holds now,
        its spare stores included, so that the first direct push of a run copies at the
        steady rate (agents started with --prealloc-store-gib hold spares from the start);
        on CUDA it also builds the GPU checksum kernel. Returns how many segments were newly
        mapped."""
        from ckpt_agent import shm
        from ckpt_agent.host_store import segment_prefix
        from ckpt_client.direct_push import warm_gpu

        warm_gpu()
        prefix = segment_prefix(node_id)
        try:
            names = sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix))
        except FileNotFoundError:
            return 0
        return self.segments.pin_all(names)

    def get(self, name: str, version: int = 0, *, tensors: bool = False) -> tpb.Checkpoint:
        return self._call(
            "GetCheckpoint",
            cpb.GetCheckpointRequest(name=name, version=version, include_tensors=tensors),
        )

    def checkpoints(self, name: str = "") -> list[tpb.Checkpoint]:
        return list(
            self._call("ListCheckpoints", cpb.ListCheckpointsRequest(name=name)).checkpoints
        )

    def delete(self, name: str, version: int = 0) -> list[tpb.Checkpoint]:
        return list(
            self._call(
                "DeleteCheckpoint", cpb.DeleteCheckpointRequest(name=name, version=version)
            ).deleted
        )

    # operators
    def update(
        self,
        checkpoint: str,
        version: int = 0,
        *,
        ranks: list[int] | None = None,
        instances: list[str] | None = None,
        tensors: list[str] | None = None,
        bucket_bytes: int = 0,
        timeout_s: float = 0.0,
        method: int = tpb.UPDATE_METHOD_UNSPECIFIED,
        stream: bool = False,
    ) -> tpb.Job:
        return self._call(
            "Update",
            cpb.UpdateRequest(
                checkpoint=checkpoint,
                version=version,
                ranks=ranks or [],
                instances=instances or [],
                tensors=tensors or [],
                bucket_bytes=bucket_bytes,
                timeout_s=timeout_s,
                method=method,
                stream=stream,
            ),
        )

    def job(self, job_id: str) -> tpb.Job:
        return self._call("GetJob", cpb.GetJobRequest(id=job_id))

    def jobs(self, limit: int = 50) -> list[tpb.Job]:
        return list(self._call("ListJobs", cpb.ListJobsRequest(limit=limit)).jobs)

    def cancel(self, job_id: str) -> tpb.Job:
        return self._call("CancelJob", cpb.GetJobRequest(id=job_id))

    def watch(self, job_id: str, timeout_s: float = 3600.0) -> Iterator[tpb.Job]:
        try:
            yield from self._stub.WatchJob(
                cpb.GetJobRequest(id=job_id), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise error_for(e.code().name, e.details() or str(e)) from None

    def wait(self, job_id: str, timeout_s: float = 600.0) -> tpb.Job:
        deadline = time.monotonic() + timeout_s
        last = None
        for last in self.watch(job_id, timeout_s):
            if last.state in TERMINAL:
                return last
        if last is not None and last.state in TERMINAL:
            return last
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"job {job_id} did not finish within {timeout_s:.0f}s")
        return self.job(job_id)

    def healthy(self) -> bool:
        """Whether ckptd's grpc.health.v1 service says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        res = self._call("Check", health_pb2.HealthCheckRequest(), stub=stub)
        return res.status == health_pb2.HealthCheckResponse.SERVING

    def remove_agent(self, node_id: str, *, force: bool = False) -> tpb.Agent:
        req = cpb.RemoveAgentRequest(node_id=node_id, force=force)
        return self._call("RemoveAgent", req).removed

    def agents(self) -> list[tpb.Agent]:
        return list(self._call("ListAgents", cpb.ListAgentsRequest()).agents)

    # autoscalers
    def register_instance(self, instance: tpb.Instance) -> tpb.Instance:
        return self._call("RegisterInstance", instance)

    def instances(self) -> list[tpb.Instance]:
        return list(self._call("ListInstances", cpb.ListInstancesRequest()).instances)

    def remove_instance(self, name: str) -> tpb.Instance:
        return self._call("RemoveInstance", cpb.RemoveInstanceRequest(name=name)).removed

    def join(
        self, instance: tpb.Instance, checkpoint: str = "", version: int = 0, timeout_s: float = 0.0
    ) -> tpb.Job:
        return self._call(
            "JoinInstance",
            cpb.JoinInstanceRequest(
                instance=instance, checkpoint=checkpoint, version=version, timeout_s=timeout_s
            ),
        )
