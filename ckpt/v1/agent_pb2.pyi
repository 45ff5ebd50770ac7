from ckpt.v1 import ipc_pb2 as _ipc_pb2
from ckpt.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureOrigin(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORIGIN_UNSPECIFIED: _ClassVar[FailureOrigin]
    ORIGIN_SELF: _ClassVar[FailureOrigin]
    ORIGIN_PEER: _ClassVar[FailureOrigin]
    ORIGIN_DAEMON: _ClassVar[FailureOrigin]
ORIGIN_UNSPECIFIED: FailureOrigin
ORIGIN_SELF: FailureOrigin
ORIGIN_PEER: FailureOrigin
ORIGIN_DAEMON: FailureOrigin

class HeldStore(_message.Message):
    __slots__ = ("checkpoint", "version", "device", "segment", "nbytes", "p2p")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    P2P_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    device: int
    segment: str
    nbytes: int
    p2p: P2PSource
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., device: _Optional[int] = ..., segment: _Optional[str] = ..., nbytes: _Optional[int] = ..., p2p: _Optional[_Union[P2PSource, _Mapping]] = ...) -> None: ...

class P2PSource(_message.Message):
    __slots__ = ("session", "addr", "local_segment")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    session: str
    addr: int
    local_segment: str
    def __init__(self, session: _Optional[str] = ..., addr: _Optional[int] = ..., local_segment: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("node_id", "host", "devices", "stores", "version", "pid", "ipc_dir", "host_free_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    IPC_DIR_FIELD_NUMBER: _ClassVar[int]
    HOST_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    host: str
    devices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Device]
    stores: _containers.RepeatedCompositeFieldContainer[HeldStore]
    version: str
    pid: int
    ipc_dir: str
    host_free_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., host: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[_types_pb2.Device, _Mapping]]] = ..., stores: _Optional[_Iterable[_Union[HeldStore, _Mapping]]] = ..., version: _Optional[str] = ..., pid: _Optional[int] = ..., ipc_dir: _Optional[str] = ..., host_free_bytes: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("devices", "host_free_bytes")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    HOST_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[_types_pb2.Device]
    host_free_bytes: int
    def __init__(self, devices: _Optional[_Iterable[_Union[_types_pb2.Device, _Mapping]]] = ..., host_free_bytes: _Optional[int] = ...) -> None: ...

class ScannedTensor(_message.Message):
    __slots__ = ("meta", "data_offset")
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    meta: _types_pb2.TensorMeta
    data_offset: int
    def __init__(self, meta: _Optional[_Union[_types_pb2.TensorMeta, _Mapping]] = ..., data_offset: _Optional[int] = ...) -> None: ...

class ScannedFile(_message.Message):
    __slots__ = ("path", "tensors", "size", "dev", "ino", "ctime_ns")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEV_FIELD_NUMBER: _ClassVar[int]
    INO_FIELD_NUMBER: _ClassVar[int]
    CTIME_NS_FIELD_NUMBER: _ClassVar[int]
    path: str
    tensors: _containers.RepeatedCompositeFieldContainer[ScannedTensor]
    size: int
    dev: int
    ino: int
    ctime_ns: int
    def __init__(self, path: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[ScannedTensor, _Mapping]]] = ..., size: _Optional[int] = ..., dev: _Optional[int] = ..., ino: _Optional[int] = ..., ctime_ns: _Optional[int] = ...) -> None: ...

class ScanResult(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ScannedFile]
    def __init__(self, files: _Optional[_Iterable[_Union[ScannedFile, _Mapping]]] = ...) -> None: ...

class GroupReady(_message.Message):
    __slots__ = ("addr", "port")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    addr: str
    port: int
    def __init__(self, addr: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class StoreReady(_message.Message):
    __slots__ = ("segment", "nbytes", "seconds", "p2p", "checksums")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    P2P_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nbytes: int
    seconds: float
    p2p: P2PSource
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, segment: _Optional[str] = ..., nbytes: _Optional[int] = ..., seconds: _Optional[float] = ..., p2p: _Optional[_Union[P2PSource, _Mapping]] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "ok", "code", "message", "scan", "group", "store", "update", "ready", "diff")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    ok: bool
    code: str
    message: str
    scan: ScanResult
    group: GroupReady
    store: StoreReady
    update: UpdateDone
    ready: WorkerReady
    diff: DiffDone
    def __init__(self, command_id: _Optional[int] = ..., ok: _Optional[bool] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., scan: _Optional[_Union[ScanResult, _Mapping]] = ..., group: _Optional[_Union[GroupReady, _Mapping]] = ..., store: _Optional[_Union[StoreReady, _Mapping]] = ..., update: _Optional[_Union[UpdateDone, _Mapping]] = ..., ready: _Optional[_Union[WorkerReady, _Mapping]] = ..., diff: _Optional[_Union[DiffDone, _Mapping]] = ...) -> None: ...

class UpdateDone(_message.Message):
    __slots__ = ("result", "origin", "layout")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.RankResult
    origin: FailureOrigin
    layout: _ipc_pb2.EngineLayout
    def __init__(self, result: _Optional[_Union[_types_pb2.RankResult, _Mapping]] = ..., origin: _Optional[_Union[FailureOrigin, str]] = ..., layout: _Optional[_Union[_ipc_pb2.EngineLayout, _Mapping]] = ...) -> None: ...

class WorkerReady(_message.Message):
    __slots__ = ("ceilings",)
    class CeilingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CEILINGS_FIELD_NUMBER: _ClassVar[int]
    ceilings: _containers.ScalarMap[str, float]
    def __init__(self, ceilings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("job_id", "device", "bucket", "bytes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: int
    bucket: int
    bytes: int
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[int] = ..., bucket: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "result", "progress")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    result: CommandResult
    progress: Progress
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., result: _Optional[_Union[CommandResult, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ...) -> None: ...

class Scan(_message.Message):
    __slots__ = ("paths", "read_uid")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    READ_UID_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    read_uid: int
    def __init__(self, paths: _Optional[_Iterable[str]] = ..., read_uid: _Optional[int] = ...) -> None: ...

class LoadItem(_message.Message):
    __slots__ = ("path", "file_offset", "nbytes", "store_offset", "file_size", "file_dev", "file_ino", "file_ctime_ns", "rows", "stride")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FILE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STORE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_DEV_FIELD_NUMBER: _ClassVar[int]
    FILE_INO_FIELD_NUMBER: _ClassVar[int]
    FILE_CTIME_NS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    path: str
    file_offset: int
    nbytes: int
    store_offset: int
    file_size: int
    file_dev: int
    file_ino: int
    file_ctime_ns: int
    rows: int
    stride: int
    def __init__(self, path: _Optional[str] = ..., file_offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., store_offset: _Optional[int] = ..., file_size: _Optional[int] = ..., file_dev: _Optional[int] = ..., file_ino: _Optional[int] = ..., file_ctime_ns: _Optional[int] = ..., rows: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("checkpoint", "version", "device", "nbytes", "items", "read_uid")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    READ_UID_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    device: int
    nbytes: int
    items: _containers.RepeatedCompositeFieldContainer[LoadItem]
    read_uid: int
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., device: _Optional[int] = ..., nbytes: _Optional[int] = ..., items: _Optional[_Iterable[_Union[LoadItem, _Mapping]]] = ..., read_uid: _Optional[int] = ...) -> None: ...

class Seal(_message.Message):
    __slots__ = ("checkpoint", "version", "device", "items")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    device: int
    items: _containers.RepeatedCompositeFieldContainer[LoadItem]
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., device: _Optional[int] = ..., items: _Optional[_Iterable[_Union[LoadItem, _Mapping]]] = ...) -> None: ...

class Drop(_message.Message):
    __slots__ = ("checkpoint", "version", "device")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    device: int
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., device: _Optional[int] = ...) -> None: ...

class PrepareGroup(_message.Message):
    __slots__ = ("job_id", "device", "world_size", "group")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: int
    world_size: int
    group: str
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[int] = ..., world_size: _Optional[int] = ..., group: _Optional[str] = ...) -> None: ...

class BucketEntry(_message.Message):
    __slots__ = ("tensor", "bucket_offset", "store_offset", "nbytes", "chunk_offset", "rows", "stride", "source")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    BUCKET_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STORE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    bucket_offset: int
    store_offset: int
    nbytes: int
    chunk_offset: int
    rows: int
    stride: int
    source: int
    def __init__(self, tensor: _Optional[int] = ..., bucket_offset: _Optional[int] = ..., store_offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., chunk_offset: _Optional[int] = ..., rows: _Optional[int] = ..., stride: _Optional[int] = ..., source: _Optional[int] = ...) -> None: ...

class Bucket(_message.Message):
    __slots__ = ("owner", "nbytes", "entries")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    owner: int
    nbytes: int
    entries: _containers.RepeatedCompositeFieldContainer[BucketEntry]
    def __init__(self, owner: _Optional[int] = ..., nbytes: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[BucketEntry, _Mapping]]] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("group", "group_rank", "world_size", "master_addr", "master_port")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    group: str
    group_rank: int
    world_size: int
    master_addr: str
    master_port: int
    def __init__(self, group: _Optional[str] = ..., group_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ...) -> None: ...

class UpdatePlan(_message.Message):
    __slots__ = ("tensors", "buckets", "bucket_bytes", "nbuf", "sources", "partial", "kept", "streamed", "delta_base")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_BYTES_FIELD_NUMBER: _ClassVar[int]
    NBUF_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    STREAMED_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_types_pb2.TensorMeta]
    buckets: _containers.RepeatedCompositeFieldContainer[Bucket]
    bucket_bytes: int
    nbuf: int
    sources: _containers.RepeatedCompositeFieldContainer[P2PSource]
    partial: bool
    kept: bool
    streamed: bool
    delta_base: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[_types_pb2.TensorMeta, _Mapping]]] = ..., buckets: _Optional[_Iterable[_Union[Bucket, _Mapping]]] = ..., bucket_bytes: _Optional[int] = ..., nbuf: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[P2PSource, _Mapping]]] = ..., partial: _Optional[bool] = ..., kept: _Optional[bool] = ..., streamed: _Optional[bool] = ..., delta_base: _Optional[int] = ...) -> None: ...

class Deadlines(_message.Message):
    __slots__ = ("timeout_s", "receiver_timeout_s")
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    receiver_timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ..., receiver_timeout_s: _Optional[float] = ...) -> None: ...

class RunUpdate(_message.Message):
    __slots__ = ("job_id", "device", "checkpoint", "version", "is_target", "want_layout", "rendezvous", "plan", "deadlines")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IS_TARGET_FIELD_NUMBER: _ClassVar[int]
    WANT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    DEADLINES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    device: int
    checkpoint: str
    version: int
    is_target: bool
    want_layout: bool
    rendezvous: Rendezvous
    plan: UpdatePlan
    deadlines: Deadlines
    def __init__(self, job_id: _Optional[str] = ..., device: _Optional[int] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., is_target: _Optional[bool] = ..., want_layout: _Optional[bool] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., plan: _Optional[_Union[UpdatePlan, _Mapping]] = ..., deadlines: _Optional[_Union[Deadlines, _Mapping]] = ...) -> None: ...

class DiffItem(_message.Message):
    __slots__ = ("base_offset", "target_offset", "nbytes", "itemsize")
    BASE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TARGET_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ITEMSIZE_FIELD_NUMBER: _ClassVar[int]
    base_offset: int
    target_offset: int
    nbytes: int
    itemsize: int
    def __init__(self, base_offset: _Optional[int] = ..., target_offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., itemsize: _Optional[int] = ...) -> None: ...

class Diff(_message.Message):
    __slots__ = ("checkpoint", "version", "base", "device", "items", "max_nbytes")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NBYTES_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    base: int
    device: int
    items: _containers.RepeatedCompositeFieldContainer[DiffItem]
    max_nbytes: int
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., base: _Optional[int] = ..., device: _Optional[int] = ..., items: _Optional[_Iterable[_Union[DiffItem, _Mapping]]] = ..., max_nbytes: _Optional[int] = ...) -> None: ...

class DiffEntry(_message.Message):
    __slots__ = ("encoding", "count", "offset", "nbytes", "checksum")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    encoding: int
    count: int
    offset: int
    nbytes: int
    checksum: int
    def __init__(self, encoding: _Optional[int] = ..., count: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class DiffDone(_message.Message):
    __slots__ = ("segment", "nbytes", "entries", "seconds")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nbytes: int
    entries: _containers.RepeatedCompositeFieldContainer[DiffEntry]
    seconds: float
    def __init__(self, segment: _Optional[str] = ..., nbytes: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[DiffEntry, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class PatchItem(_message.Message):
    __slots__ = ("offset", "nbytes", "itemsize", "encoding", "count", "delta_offset", "delta_nbytes", "target_checksum")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ITEMSIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELTA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DELTA_NBYTES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    offset: int
    nbytes: int
    itemsize: int
    encoding: int
    count: int
    delta_offset: int
    delta_nbytes: int
    target_checksum: int
    def __init__(self, offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., itemsize: _Optional[int] = ..., encoding: _Optional[int] = ..., count: _Optional[int] = ..., delta_offset: _Optional[int] = ..., delta_nbytes: _Optional[int] = ..., target_checksum: _Optional[int] = ...) -> None: ...

class Patch(_message.Message):
    __slots__ = ("checkpoint", "version", "base", "device", "items")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    version: int
    base: int
    device: int
    items: _containers.RepeatedCompositeFieldContainer[PatchItem]
    def __init__(self, checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., base: _Optional[int] = ..., device: _Optional[int] = ..., items: _Optional[_Iterable[_Union[PatchItem, _Mapping]]] = ...) -> None: ...

class Abort(_message.Message):
    __slots__ = ("job_id", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "scan", "load", "drop", "prepare_group", "run_update", "abort", "seal", "diff", "patch")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCAN_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    PREPARE_GROUP_FIELD_NUMBER: _ClassVar[int]
    RUN_UPDATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    SEAL_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    id: int
    scan: Scan
    load: Load
    drop: Drop
    prepare_group: PrepareGroup
    run_update: RunUpdate
    abort: Abort
    seal: Seal
    diff: Diff
    patch: Patch
    def __init__(self, id: _Optional[int] = ..., scan: _Optional[_Union[Scan, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., drop: _Optional[_Union[Drop, _Mapping]] = ..., prepare_group: _Optional[_Union[PrepareGroup, _Mapping]] = ..., run_update: _Optional[_Union[RunUpdate, _Mapping]] = ..., abort: _Optional[_Union[Abort, _Mapping]] = ..., seal: _Optional[_Union[Seal, _Mapping]] = ..., diff: _Optional[_Union[Diff, _Mapping]] = ..., patch: _Optional[_Union[Patch, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("daemon_version", "heartbeat_s")
    DAEMON_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    daemon_version: str
    heartbeat_s: float
    def __init__(self, daemon_version: _Optional[str] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class DaemonMessage(_message.Message):
    __slots__ = ("welcome", "command")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    command: Command
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...
