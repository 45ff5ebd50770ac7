"""The gRPC edge: wire types in, core calls, wire types out; CkptError -> status in one place."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import agent_pb2_grpc, ckptd_pb2_grpc
from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import CkptError, FailedPrecondition, InvalidArgument, NotFound
from ckpt_common.pieces import piece_of
from ckpt_daemon import admission
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.api import convert
from ckpt_daemon.engines.endpoints import endpoint_refusal, origin
from ckpt_daemon.jobs import resolve
from ckpt_daemon.jobs.runner import JobRunner
from ckpt_daemon.model import CheckpointVersion, Instance, InstanceKind, Shard
from ckpt_daemon.plan.placement import mirror_name
from ckpt_daemon.push.pusher import Pusher
from ckpt_daemon.registry.store import Registry
from ckpt_daemon.security import auth

log = structlog.get_logger("ckptd.servicer")


BIG_REQUEST = 1 << 20  # bytes: a request this large is checked in a thread


def _status(err: CkptError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)


def _unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if request.ByteSize() > BIG_REQUEST:  # 100k tensors: off the loop (heartbeats)
                await asyncio.to_thread(admission.check_message, request)
            else:
                admission.check_message(request)
            reply = await fn(self, request, context)
            await self._registry.synced()  # what the reply reports is on disk
            return reply
        except CkptError as e:
            await context.abort(_status(e), admission.bounded(e.message))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError):
                raise
            log.exception("rpc_crashed", rpc=fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__})")

    return wrapper


class CkptServicer(ckptd_pb2_grpc.CkptServicer):
    def __init__(
        self,
        registry: Registry,
        hub: AgentHub,
        pusher: Pusher,
        jobs: JobRunner,
        verify: Callable[[Instance], Awaitable[None]] | None = None,
    ) -> None:
        """verify(instance): the engine behind its endpoint proves it is the instance's
        (ckpt_daemon.engines.trigger.EngineTrigger.verify); raises a CkptError otherwise."""
        self._registry = registry
        self._hub = hub
        self._pusher = pusher
        self._jobs = jobs
        self._verify = verify

    def _order(self) -> dict:
        return {r: i for i, r in enumerate(self._registry.rank_order())}

    def _cp(self, cv, *, include_tensors: bool = False) -> tpb.Checkpoint:
        mirror = self._registry.checkpoint(mirror_name(cv.name), cv.version)
        return convert.checkpoint_to_pb(
            cv, self._order(), include_tensors=include_tensors, mirror=mirror
        )

    @_unary
    async def PushCheckpoint(self, request: cpb.PushCheckpointRequest, context) -> tpb.Checkpoint:
        cv = await self._pusher.push(
            request.name,
            request.version,
            convert.sources_from_pb(list(request.sources)),
            list(request.ranks),
            timeout_s=request.timeout_s,
            wait=request.wait,
            replicas=request.replicas,
            probe=convert.probe_from_pb(request.probe),
            read_uid=auth.read_uid(),
        )
        return self._cp(cv)

    @_unary
    async def BeginPush(self, request: cpb.BeginPushRequest, context) -> cpb.PushPlan:
        if request.timeout_s < 0:
            raise InvalidArgument("timeout_s must not be negative")
        if request.delta_base:
            return await self._begin_delta(request)
        metas = await asyncio.to_thread(
            lambda: [
                (t.name, t.dtype, tuple(t.shape), t.nbytes, piece_of(t.piece_offset, t.piece_shape))
                for t in request.tensors
            ]
        )
        sums = await asyncio.to_thread(
            lambda: [t.checksum for t in request.tensors if t.HasField("checksum")]
        )
        cv, shards, where, parts = await self._pusher.direct.begin(
            request.name,
            request.version,
            request.node_id,
            metas,
            timeout_s=request.timeout_s,
            probe=convert.probe_from_pb(request.probe),
            part=request.part,
            parts=request.parts,
            checksums=sums,
        )
        plan = await self._push_plan(cv, shards, where)
        plan.parts.extend(
            cpb.PartWanted(tensor=i, dim=k.dim, start=k.start, length=k.length) for i, k in parts
        )
        return plan

    async def _begin_delta(self, request: cpb.BeginPushRequest) -> cpb.PushPlan:
        if request.parts > 1:
            raise InvalidArgument("a delta push is one part")
        decls = await asyncio.to_thread(convert.delta_decls, request.tensors)
        cv, shards, where = await self._pusher.delta_pushes.begin(
            request.name, request.version, request.delta_base, request.node_id, decls,
            timeout_s=request.timeout_s, probe=convert.probe_from_pb(request.probe),
        )  # fmt: skip
        return await self._push_plan(cv, shards, where)

    async def _push_plan(
        self, cv: CheckpointVersion, shards: list[Shard], where: list[tuple[int, int]]
    ) -> cpb.PushPlan:
        return cpb.PushPlan(
            checkpoint=convert.checkpoint_to_pb(cv, self._order()),
            segments=[
                cpb.PushSegment(
                    node_id=s.owner.node_id,
                    device=s.owner.device,
                    segment=s.segment,
                    nbytes=s.nbytes,
                )
                for s in shards
            ],
            targets=await asyncio.to_thread(
                lambda: [cpb.PushTarget(segment=i, offset=o) for i, o in where]
            ),
        )

    @_unary
    async def CommitPush(self, request: cpb.CommitPushRequest, context) -> tpb.Checkpoint:
        if self._pusher.delta_pushes.is_open(request.name, request.version):
            cv = await self._pusher.delta_pushes.commit(
                request.name, request.version, list(request.checksums), request.early
            )
            return convert.checkpoint_to_pb(cv, self._order())
        cv = await self._pusher.direct.commit(
            request.name, request.version, request.part, list(request.checksums),
            list(request.part_checksums),
        )  # fmt: skip
        return convert.checkpoint_to_pb(cv, self._order())

    @_unary
    async def GetCheckpoint(self, request: cpb.GetCheckpointRequest, context) -> tpb.Checkpoint:
        cv = self._registry.get_checkpoint(request.name, request.version)
        if cv is None:
            raise NotFound(f"checkpoint {request.name}@{request.version or 'latest'} not found")
        return self._cp(cv, include_tensors=request.include_tensors)

    @_unary
    async def ListCheckpoints(self, request: cpb.ListCheckpointsRequest, context):
        return cpb.ListCheckpointsResponse(
            checkpoints=[self._cp(cv) for cv in self._registry.list_checkpoints(request.name)]
        )

    @_unary
    async def DeleteCheckpoint(self, request: cpb.DeleteCheckpointRequest, context):
        deleted = await self._pusher.delete(
            request.name, request.version, self._jobs.busy_checkpoints()
        )
        order = self._order()
        return cpb.DeleteCheckpointResponse(
            deleted=[convert.checkpoint_to_pb(cv, order) for cv in deleted]
        )

    @_unary
    async def Update(self, request: cpb.UpdateRequest, context) -> tpb.Job:
        job = await self._jobs.submit_update(convert.update_spec_from_pb(request))
        return convert.job_to_pb(job)

    @_unary
    async def GetJob(self, request: cpb.GetJobRequest, context) -> tpb.Job:
        return convert.job_to_pb(self._jobs.get(request.id))

    @_unary
    async def CancelJob(self, request: cpb.GetJobRequest, context) -> tpb.Job:
        return convert.job_to_pb(self._jobs.cancel(request.id))

    @_unary
    async def ListJobs(self, request: cpb.ListJobsRequest, context) -> cpb.ListJobsResponse:
        jobs = sorted(self._registry.jobs(), key=lambda j: j.created, reverse=True)
        return cpb.ListJobsResponse(
            jobs=[convert.job_to_pb(j) for j in jobs[: request.limit or 50]]
        )

    async def WatchJob(self, request: cpb.GetJobRequest, context) -> AsyncIterator[tpb.Job]:
        try:
            admission.check_message(request)
            async for job in self._jobs.watch(request.id):
                yield convert.job_to_pb(job)
        except CkptError as e:
            await context.abort(_status(e), admission.bounded(e.message))

    @_unary
    async def ListAgents(self, request: cpb.ListAgentsRequest, context):
        order = self._order()
        return cpb.ListAgentsResponse(
            agents=[
                convert.agent_to_pb(a, order)
                for a in sorted(self._registry.agents(), key=lambda a: a.node_id)
            ]
        )

    @_unary
    async def RemoveAgent(self, request: cpb.RemoveAgentRequest, context):
        admission.check_name("node_id", request.node_id)
        if self._registry.agent(request.node_id) is None:
            raise NotFound(f"agent {admission.shown(request.node_id)} not found")
        # refused before anything changes: a forced removal never cuts a running job short
        if request.node_id in self._jobs.running_nodes():
            raise FailedPrecondition(
                f"a job is running on {request.node_id}: wait for it or cancel it first"
            )
        if self._hub.attached(request.node_id):
            if not request.force:
                raise FailedPrecondition(
                    f"agent {request.node_id} is attached: stop it first, or force"
                )
            self._hub.detach(request.node_id, "removed by an operator")
        a = self._registry.remove_agent(request.node_id)
        if a is None:
            raise NotFound(f"agent {admission.shown(request.node_id)} not found")
        a.attached = False
        return cpb.RemoveAgentResponse(removed=convert.agent_to_pb(a, {}))

    async def _check_endpoint(self, inst: Instance) -> None:
        if inst.kind != InstanceKind.VLLM:
            return
        hosts = [a.host for r in inst.ranks if (a := self._registry.agent(r.node_id))]
        why = endpoint_refusal(inst.endpoint, hosts)
        if why:
            raise InvalidArgument(f"instance {inst.name!r}: {why}")
        inst.endpoint = origin(inst.endpoint)
        if self._verify is not None:  # accepted only once its engine proved it is the one
            await self._verify(inst)

    @_unary
    async def RegisterInstance(self, request: tpb.Instance, context) -> tpb.Instance:
        inst = convert.instance_from_pb(request)
        await self._check_endpoint(inst)
        old = self._registry.instance(inst.name)
        if old:
            inst.checkpoint, inst.version, inst.ready = old.checkpoint, old.version, old.ready
        resolve.check_instance_devices(self._registry, inst)
        self._registry.put_instance(inst)
        return convert.instance_to_pb(inst, self._order())

    @_unary
    async def JoinInstance(self, request: cpb.JoinInstanceRequest, context) -> tpb.Job:
        if request.timeout_s < 0:
            raise InvalidArgument("timeout_s must not be negative")
        inst = convert.instance_from_pb(request.instance)
        await self._check_endpoint(inst)
        job = await self._jobs.submit_join(
            inst, request.checkpoint, request.version, request.timeout_s
        )
        return convert.job_to_pb(job)

    @_unary
    async def ListInstances(self, request: cpb.ListInstancesRequest, context):
        order = self._order()
        return cpb.ListInstancesResponse(
            instances=[
                convert.instance_to_pb(i, order)
                for i in sorted(self._registry.instances(), key=lambda i: i.name)
            ]
        )

    @_unary
    async def RemoveInstance(self, request: cpb.RemoveInstanceRequest, context):
        inst = self._registry.remove_instance(request.name)
        if not inst:
            raise NotFound(f"instance {request.name!r} not found")
        return cpb.RemoveInstanceResponse(removed=convert.instance_to_pb(inst, self._order()))


OFF_LOOP_BYTES = 1 << 20  # an agent message larger than this is parsed on a thread
MAX_HELLO_BYTES = 64 << 20  # 1024 devices and 65536 stores fit in a fraction of it


async def _decoded(messages: AsyncIterator[bytes]) -> AsyncIterator[apb.AgentMessage]:
    """The agent stream's messages, parsed here (not by gRPC on the event loop): a large one
    on a thread, so the loop serves every other call meanwhile. A first message (the Hello)
    over MAX_HELLO_BYTES is refused unread; bytes that are no AgentMessage end the stream:
    INVALID_ARGUMENT either way."""
    first = True
    async for raw in messages:
        if first and len(raw) > MAX_HELLO_BYTES:
            raise InvalidArgument(
                f"the agent's hello is {len(raw)} bytes: over {MAX_HELLO_BYTES >> 20} MiB"
            )
        first = False
        try:
            if len(raw) > OFF_LOOP_BYTES:
                msg = await asyncio.to_thread(apb.AgentMessage.FromString, raw)
            else:
                msg = apb.AgentMessage.FromString(raw)
        except DecodeError as e:
            raise InvalidArgument(f"the agent stream carried a malformed message: {e}") from None
        yield msg


class AgentLinkServicer(agent_pb2_grpc.AgentLinkServicer):
    """Its requests arrive as bytes (add_agent_link): _decoded parses them."""

    def __init__(self, hub: AgentHub) -> None:
        self._hub = hub

    async def Attach(
        self, request_iterator: AsyncIterator[bytes], context
    ) -> AsyncIterator[apb.DaemonMessage]:
        try:
            async for msg in self._hub.serve(_decoded(request_iterator)):
                yield msg
        except CkptError as e:
            await context.abort(_status(e), admission.bounded(e.message))


def add_agent_link(servicer: AgentLinkServicer, server: Any) -> None:
    """agent_pb2_grpc.add_AgentLinkServicer_to_server, with requests left as bytes."""
    handlers = {
        "Attach": grpc.stream_stream_rpc_method_handler(
            servicer.Attach,
            request_deserializer=None,
            response_serializer=apb.DaemonMessage.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("ckpt.v1.AgentLink", handlers),)
    )
    server.add_registered_method_handlers("ckpt.v1.AgentLink", handlers)
