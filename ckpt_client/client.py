"""A typed client for ckptd. gRPC statuses come back as ckpt_common.errors exceptions.

Trainers push tensors from their own process with `push_tensors`: they are written as one
safetensors file per call (in /dev/shm by default, where the agents on this node read them)
and pushed by path.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import ckptd_pb2_grpc
from ckpt.v1 import types_pb2 as tpb
from ckpt_client.direct_methods import DirectPushMethods, PushTimes
from ckpt_common.credentials import Credentials, channel_args
from ckpt_common.errors import DeadlineExceeded, error_for

DEFAULT_ADDR = os.environ.get("CKPTD_ADDR", "127.0.0.1:7601")
TERMINAL = (tpb.JOB_SUCCEEDED, tpb.JOB_FAILED, tpb.JOB_CANCELLED)
__all__ = ["DEFAULT_ADDR", "TERMINAL", "Client", "PushTimes"]


class Client(DirectPushMethods):
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
