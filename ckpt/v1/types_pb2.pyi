from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckpointState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_STATE_UNSPECIFIED: _ClassVar[CheckpointState]
    CHECKPOINT_LOADING: _ClassVar[CheckpointState]
    CHECKPOINT_READY: _ClassVar[CheckpointState]
    CHECKPOINT_FAILED: _ClassVar[CheckpointState]
    CHECKPOINT_LOST: _ClassVar[CheckpointState]

class ShardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARD_STATE_UNSPECIFIED: _ClassVar[ShardState]
    SHARD_LOADING: _ClassVar[ShardState]
    SHARD_READY: _ClassVar[ShardState]
    SHARD_FAILED: _ClassVar[ShardState]
    SHARD_LOST: _ClassVar[ShardState]

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_ATTACHED: _ClassVar[AgentState]
    AGENT_DETACHED: _ClassVar[AgentState]

class InstanceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_KIND_UNSPECIFIED: _ClassVar[InstanceKind]
    INSTANCE_VLLM: _ClassVar[InstanceKind]
    INSTANCE_RECEIVER: _ClassVar[InstanceKind]

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_UPDATE: _ClassVar[JobKind]
    JOB_JOIN: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_PENDING: _ClassVar[JobState]
    JOB_RUNNING: _ClassVar[JobState]
    JOB_SUCCEEDED: _ClassVar[JobState]
    JOB_FAILED: _ClassVar[JobState]
    JOB_CANCELLED: _ClassVar[JobState]

class UpdateMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_METHOD_UNSPECIFIED: _ClassVar[UpdateMethod]
    UPDATE_BROADCAST: _ClassVar[UpdateMethod]
    UPDATE_P2P: _ClassVar[UpdateMethod]
    UPDATE_SHARDED: _ClassVar[UpdateMethod]
    UPDATE_DELTA: _ClassVar[UpdateMethod]
CHECKPOINT_STATE_UNSPECIFIED: CheckpointState
CHECKPOINT_LOADING: CheckpointState
CHECKPOINT_READY: CheckpointState
CHECKPOINT_FAILED: CheckpointState
CHECKPOINT_LOST: CheckpointState
SHARD_STATE_UNSPECIFIED: ShardState
SHARD_LOADING: ShardState
SHARD_READY: ShardState
SHARD_FAILED: ShardState
SHARD_LOST: ShardState
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_ATTACHED: AgentState
AGENT_DETACHED: AgentState
INSTANCE_KIND_UNSPECIFIED: InstanceKind
INSTANCE_VLLM: InstanceKind
INSTANCE_RECEIVER: InstanceKind
JOB_KIND_UNSPECIFIED: JobKind
JOB_UPDATE: JobKind
JOB_JOIN: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_PENDING: JobState
JOB_RUNNING: JobState
JOB_SUCCEEDED: JobState
JOB_FAILED: JobState
JOB_CANCELLED: JobState
UPDATE_METHOD_UNSPECIFIED: UpdateMethod
UPDATE_BROADCAST: UpdateMethod
UPDATE_P2P: UpdateMethod
UPDATE_SHARDED: UpdateMethod
UPDATE_DELTA: UpdateMethod

class TensorMeta(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "checksum", "piece_offset", "piece_shape", "delta")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    PIECE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PIECE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    checksum: int
    piece_offset: _containers.RepeatedScalarFieldContainer[int]
    piece_shape: _containers.RepeatedScalarFieldContainer[int]
    delta: DeltaMeta
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ..., piece_offset: _Optional[_Iterable[int]] = ..., piece_shape: _Optional[_Iterable[int]] = ..., delta: _Optional[_Union[DeltaMeta, _Mapping]] = ...) -> None: ...

class DeltaMeta(_message.Message):
    __slots__ = ("base_version", "encoding", "count", "base_checksum", "target_checksum", "target_nbytes")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TARGET_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TARGET_NBYTES_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    encoding: int
    count: int
    base_checksum: int
    target_checksum: int
    target_nbytes: int
    def __init__(self, base_version: _Optional[int] = ..., encoding: _Optional[int] = ..., count: _Optional[int] = ..., base_checksum: _Optional[int] = ..., target_checksum: _Optional[int] = ..., target_nbytes: _Optional[int] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("path", "node_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    node_id: str
    def __init__(self, path: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("node_id", "device", "rank", "nbytes", "tensor_count", "state", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device: int
    rank: int
    nbytes: int
    tensor_count: int
    state: ShardState
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., device: _Optional[int] = ..., rank: _Optional[int] = ..., nbytes: _Optional[int] = ..., tensor_count: _Optional[int] = ..., state: _Optional[_Union[ShardState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("name", "version", "state", "reason", "total_bytes", "tensor_count", "shards", "created_unix", "ready_unix", "tensors", "replicas", "mirrors", "probe")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    READY_UNIX_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIRRORS_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    state: CheckpointState
    reason: str
    total_bytes: int
    tensor_count: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    created_unix: float
    ready_unix: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorMeta]
    replicas: int
    mirrors: _containers.RepeatedCompositeFieldContainer[Shard]
    probe: Probe
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[CheckpointState, str]] = ..., reason: _Optional[str] = ..., total_bytes: _Optional[int] = ..., tensor_count: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., created_unix: _Optional[float] = ..., ready_unix: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorMeta, _Mapping]]] = ..., replicas: _Optional[int] = ..., mirrors: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("prompt_token_ids", "expected_token_ids", "expected_logprobs", "logprob_tolerance")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    expected_token_ids: _containers.RepeatedScalarFieldContainer[int]
    expected_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logprob_tolerance: float
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., expected_token_ids: _Optional[_Iterable[int]] = ..., expected_logprobs: _Optional[_Iterable[float]] = ..., logprob_tolerance: _Optional[float] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("index", "kind", "uuid", "total_bytes", "free_bytes", "rank", "ceilings")
    class CeilingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CEILINGS_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: str
    uuid: str
    total_bytes: int
    free_bytes: int
    rank: int
    ceilings: _containers.ScalarMap[str, float]
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[str] = ..., uuid: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., ceilings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("node_id", "host", "state", "devices", "last_seen_unix", "version", "pid", "ipc_dir")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    IPC_DIR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    state: AgentState
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    last_seen_unix: float
    version: str
    pid: int
    ipc_dir: str
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[_Union[AgentState, str]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., last_seen_unix: _Optional[float] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., ipc_dir: _Optional[str] = ...) -> None: ...

class InstanceRank(_message.Message):
    __slots__ = ("node_id", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    device: int
    def __init__(self, node_id: _Optional[str] = ..., device: _Optional[int] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("name", "kind", "endpoint", "tp_size", "ranks", "checkpoint", "version", "ready", "reason", "global_ranks", "weight_transfer", "overlays", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    OVERLAYS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: InstanceKind
    endpoint: str
    tp_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[InstanceRank]
    checkpoint: str
    version: int
    ready: bool
    reason: str
    global_ranks: _containers.RepeatedScalarFieldContainer[int]
    weight_transfer: str
    overlays: _containers.RepeatedCompositeFieldContainer[Overlay]
    serving: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[InstanceKind, str]] = ..., endpoint: _Optional[str] = ..., tp_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[InstanceRank, _Mapping]]] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ..., global_ranks: _Optional[_Iterable[int]] = ..., weight_transfer: _Optional[str] = ..., overlays: _Optional[_Iterable[_Union[Overlay, _Mapping]]] = ..., serving: _Optional[str] = ...) -> None: ...

class Overlay(_message.Message):
    __slots__ = ("checkpoint", "version", "tensors")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    tensors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[str]] = ...) -> None: ...

class PhaseTimes(_message.Message):
    __slots__ = ("copy_s", "broadcast_s", "reload_s", "setup_s", "total_s")
    COPY_S_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_S_FIELD_NUMBER: _ClassVar[int]
    RELOAD_S_FIELD_NUMBER: _ClassVar[int]
    SETUP_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    copy_s: float
    broadcast_s: float
    reload_s: float
    setup_s: float
    total_s: float
    def __init__(self, copy_s: _Optional[float] = ..., broadcast_s: _Optional[float] = ..., reload_s: _Optional[float] = ..., setup_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class RankResult(_message.Message):
    __slots__ = ("rank", "node_id", "device", "ok", "reason", "times", "bytes", "engine_untouched", "layout", "copy_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINE_UNTOUCHED_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COPY_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node_id: str
    device: int
    ok: bool
    reason: str
    times: PhaseTimes
    bytes: int
    engine_untouched: bool
    layout: str
    copy_bytes: int
    def __init__(self, rank: _Optional[int] = ..., node_id: _Optional[str] = ..., device: _Optional[int] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ..., times: _Optional[_Union[PhaseTimes, _Mapping]] = ..., bytes: _Optional[int] = ..., engine_untouched: _Optional[bool] = ..., layout: _Optional[str] = ..., copy_bytes: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "reason", "checkpoint", "version", "ranks", "instances", "buckets_total", "buckets_done", "bytes_total", "bucket_bytes", "created_unix", "started_unix", "finished_unix", "results", "method", "first_bucket_s", "requested_method", "method_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FIRST_BUCKET_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    state: JobState
    reason: str
    checkpoint: str
    version: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    instances: _containers.RepeatedScalarFieldContainer[str]
    buckets_total: int
    buckets_done: int
    bytes_total: int
    bucket_bytes: int
    created_unix: float
    started_unix: float
    finished_unix: float
    results: _containers.RepeatedCompositeFieldContainer[RankResult]
    method: UpdateMethod
    first_bucket_s: float
    requested_method: UpdateMethod
    method_reason: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., instances: _Optional[_Iterable[str]] = ..., buckets_total: _Optional[int] = ..., buckets_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bucket_bytes: _Optional[int] = ..., created_unix: _Optional[float] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ..., results: _Optional[_Iterable[_Union[RankResult, _Mapping]]] = ..., method: _Optional[_Union[UpdateMethod, str]] = ..., first_bucket_s: _Optional[float] = ..., requested_method: _Optional[_Union[UpdateMethod, str]] = ..., method_reason: _Optional[str] = ...) -> None: ...
