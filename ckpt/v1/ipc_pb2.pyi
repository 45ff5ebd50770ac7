from ckpt.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReceiverHello(_message.Message):
    __slots__ = ("engine", "pid", "job_id")
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    engine: str
    pid: int
    job_id: str
    def __init__(self, engine: _Optional[str] = ..., pid: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class BucketLoaded(_message.Message):
    __slots__ = ("bucket",)
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    def __init__(self, bucket: _Optional[int] = ...) -> None: ...

class ReceiverDone(_message.Message):
    __slots__ = ("ok", "reason", "checkpoint", "version", "touched")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOUCHED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    checkpoint: str
    version: int
    touched: bool
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., touched: _Optional[bool] = ...) -> None: ...

class KeptTensor(_message.Message):
    __slots__ = ("name", "kind", "offset", "shape")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KEPT_UNSPECIFIED: _ClassVar[KeptTensor.Kind]
        KEPT_WHOLE: _ClassVar[KeptTensor.Kind]
        KEPT_BOX: _ClassVar[KeptTensor.Kind]
        KEPT_NONE: _ClassVar[KeptTensor.Kind]
    KEPT_UNSPECIFIED: KeptTensor.Kind
    KEPT_WHOLE: KeptTensor.Kind
    KEPT_BOX: KeptTensor.Kind
    KEPT_NONE: KeptTensor.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: KeptTensor.Kind
    offset: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[KeptTensor.Kind, str]] = ..., offset: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class EngineLayout(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[KeptTensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[KeptTensor, _Mapping]]] = ...) -> None: ...

class Validated(_message.Message):
    __slots__ = ("ok", "reason", "layout")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    layout: EngineLayout
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., layout: _Optional[_Union[EngineLayout, _Mapping]] = ...) -> None: ...

class ReceiverMessage(_message.Message):
    __slots__ = ("hello", "loaded", "done", "validated", "job_id")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    VALIDATED_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    hello: ReceiverHello
    loaded: BucketLoaded
    done: ReceiverDone
    validated: Validated
    job_id: str
    def __init__(self, hello: _Optional[_Union[ReceiverHello, _Mapping]] = ..., loaded: _Optional[_Union[BucketLoaded, _Mapping]] = ..., done: _Optional[_Union[ReceiverDone, _Mapping]] = ..., validated: _Optional[_Union[Validated, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class Begin(_message.Message):
    __slots__ = ("job_id", "checkpoint", "version", "buffer", "slot_bytes", "nbuf", "bucket_count", "tensors", "partial", "device", "kept", "want_layout")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NBUF_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    WANT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    checkpoint: str
    version: int
    buffer: str
    slot_bytes: int
    nbuf: int
    bucket_count: int
    tensors: _containers.RepeatedCompositeFieldContainer[_types_pb2.TensorMeta]
    partial: bool
    device: int
    kept: bool
    want_layout: bool
    def __init__(self, job_id: _Optional[str] = ..., checkpoint: _Optional[str] = ..., version: _Optional[int] = ..., buffer: _Optional[str] = ..., slot_bytes: _Optional[int] = ..., nbuf: _Optional[int] = ..., bucket_count: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_types_pb2.TensorMeta, _Mapping]]] = ..., partial: _Optional[bool] = ..., device: _Optional[int] = ..., kept: _Optional[bool] = ..., want_layout: _Optional[bool] = ...) -> None: ...

class IpcTensor(_message.Message):
    __slots__ = ("tensor", "offset", "nbytes", "chunk_offset", "copy")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    tensor: int
    offset: int
    nbytes: int
    chunk_offset: int
    copy: bool
    def __init__(self, tensor: _Optional[int] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., chunk_offset: _Optional[int] = ..., copy: _Optional[bool] = ...) -> None: ...

class BucketReady(_message.Message):
    __slots__ = ("bucket", "slot", "entries")
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    bucket: int
    slot: int
    entries: _containers.RepeatedCompositeFieldContainer[IpcTensor]
    def __init__(self, bucket: _Optional[int] = ..., slot: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[IpcTensor, _Mapping]]] = ...) -> None: ...

class Proceed(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("ok", "reason")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("begin", "proceed", "bucket", "end", "job_id")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    PROCEED_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    begin: Begin
    proceed: Proceed
    bucket: BucketReady
    end: End
    job_id: str
    def __init__(self, begin: _Optional[_Union[Begin, _Mapping]] = ..., proceed: _Optional[_Union[Proceed, _Mapping]] = ..., bucket: _Optional[_Union[BucketReady, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...
