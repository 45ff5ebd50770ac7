from ckpt.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushCheckpointRequest(_message.Message):
    __slots__ = ("name", "version", "sources", "ranks", "timeout_s", "wait", "replicas", "probe")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    sources: _containers.RepeatedCompositeFieldContainer[_types_pb2.Source]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    timeout_s: float
    wait: bool
    replicas: int
    probe: _types_pb2.Probe
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[_types_pb2.Source, _Mapping]]] = ..., ranks: _Optional[_Iterable[int]] = ..., timeout_s: _Optional[float] = ..., wait: _Optional[bool] = ..., replicas: _Optional[int] = ..., probe: _Optional[_Union[_types_pb2.Probe, _Mapping]] = ...) -> None: ...

class BeginPushRequest(_message.Message):
    __slots__ = ("name", "version", "node_id", "tensors", "timeout_s", "probe", "part", "parts", "delta_base")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    node_id: str
    tensors: _containers.RepeatedCompositeFieldContainer[_types_pb2.TensorMeta]
    timeout_s: float
    probe: _types_pb2.Probe
    part: int
    parts: int
    delta_base: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., node_id: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_types_pb2.TensorMeta, _Mapping]]] = ..., timeout_s: _Optional[float] = ..., probe: _Optional[_Union[_types_pb2.Probe, _Mapping]] = ..., part: _Optional[int] = ..., parts: _Optional[int] = ..., delta_base: _Optional[int] = ...) -> None: ...

class PushSegment(_message.Message):
    __slots__ = ("node_id", "device", "segment", "nbytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device: int
    segment: str
    nbytes: int
    def __init__(self, node_id: _Optional[str] = ..., device: _Optional[int] = ..., segment: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class PushTarget(_message.Message):
    __slots__ = ("segment", "offset")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    segment: int
    offset: int
    def __init__(self, segment: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PartWanted(_message.Message):
    __slots__ = ("tensor", "dim", "start", "length")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    dim: int
    start: int
    length: int
    def __init__(self, tensor: _Optional[int] = ..., dim: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PushPlan(_message.Message):
    __slots__ = ("checkpoint", "segments", "targets", "parts")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: _types_pb2.Checkpoint
    segments: _containers.RepeatedCompositeFieldContainer[PushSegment]
    targets: _containers.RepeatedCompositeFieldContainer[PushTarget]
    parts: _containers.RepeatedCompositeFieldContainer[PartWanted]
    def __init__(self, checkpoint: _Optional[_Union[_types_pb2.Checkpoint, _Mapping]] = ..., segments: _Optional[_Iterable[_Union[PushSegment, _Mapping]]] = ..., targets: _Optional[_Iterable[_Union[PushTarget, _Mapping]]] = ..., parts: _Optional[_Iterable[_Union[PartWanted, _Mapping]]] = ...) -> None: ...

class CommitPushRequest(_message.Message):
    __slots__ = ("name", "version", "part", "checksums", "part_checksums", "early")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    PART_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    part: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    part_checksums: _containers.RepeatedScalarFieldContainer[int]
    early: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., part: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ..., part_checksums: _Optional[_Iterable[int]] = ..., early: _Optional[bool] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("name", "version", "include_tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    include_tensors: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., include_tensors: _Optional[bool] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[_types_pb2.Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[_types_pb2.Checkpoint, _Mapping]]] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedCompositeFieldContainer[_types_pb2.Checkpoint]
    def __init__(self, deleted: _Optional[_Iterable[_Union[_types_pb2.Checkpoint, _Mapping]]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("checkpoint", "version", "ranks", "instances", "method", "bucket_bytes", "tensors", "timeout_s", "stream")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    instances: _containers.RepeatedScalarFieldContainer[str]
    method: _types_pb2.UpdateMethod
    bucket_bytes: int
    tensors: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    stream: bool
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., instances: _Optional[_Iterable[str]] = ..., method: _Optional[_Union[_types_pb2.UpdateMethod, str]] = ..., bucket_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ..., stream: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_types_pb2.Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[_types_pb2.Job, _Mapping]]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_types_pb2.Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[_types_pb2.Agent, _Mapping]]] = ...) -> None: ...

class JoinInstanceRequest(_message.Message):
    __slots__ = ("instance", "checkpoint", "version", "timeout_s")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    instance: _types_pb2.Instance
    checkpoint: str
    version: int
    timeout_s: float
    def __init__(self, instance: _Optional[_Union[_types_pb2.Instance, _Mapping]] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[_types_pb2.Instance, _Mapping]]] = ...) -> None: ...

class RemoveInstanceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveInstanceResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _types_pb2.Instance
    def __init__(self, removed: _Optional[_Union[_types_pb2.Instance, _Mapping]] = ...) -> None: ...

class RemoveAgentRequest(_message.Message):
    __slots__ = ("node_id", "force")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    force: bool
    def __init__(self, node_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveAgentResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: _types_pb2.Agent
    def __init__(self, removed: _Optional[_Union[_types_pb2.Agent, _Mapping]] = ...) -> None: ...
