"""Plain data the core works on. The servicer converts wire types to these at its edge."""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field, fields
from typing import Any

from ckpt_common.pieces import Piece


class CheckpointState(enum.IntEnum):
    LOADING = 1
    READY = 2
    FAILED = 3
    LOST = 4


class ShardState(enum.IntEnum):
    LOADING = 1
    READY = 2
    FAILED = 3
    LOST = 4


class JobState(enum.IntEnum):
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def done(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(enum.IntEnum):
    UPDATE = 1
    JOIN = 2


class InstanceKind(enum.IntEnum):
    VLLM = 1
    RECEIVER = 2


# An engine rank's sharding map (vllm_ext.layout): {name: "whole" | [offset, shape] | "none"}
LayoutMap = dict[str, Any]


class FailureOrigin(enum.IntEnum):
    """Where a rank's failure began (ckpt.v1.FailureOrigin)."""

    UNSPECIFIED = 0  # no failure, or not said: taken as the rank's own
    SELF = 1
    PEER = 2  # another rank of its group failed
    DAEMON = 3  # ckptd aborted the job


@dataclass(frozen=True, order=True, slots=True)
class RankRef:
    """A device of an agent. Global rank order is (node_id, device)."""

    node_id: str
    device: int

    def __str__(self) -> str:
        return f"{self.node_id}/{self.device}"


@dataclass(frozen=True, kw_only=True, slots=True)
class SourceFile:
    path: str
    node_id: str = ""  # empty: readable on every node


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorSpec:
    """A tensor as found in a source file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    path: str
    file_offset: int
    node_id: str = ""  # the source's node pin
    piece: Piece | None = None  # a box of the tensor (shape): nbytes are the box's


@dataclass(frozen=True, slots=True)
class DeltaRef:
    """How a delta store holds one tensor of a version (ckpt_common.delta): the payload's
    encoding (DENSE: the tensor's bytes) and the checksums that prove base + delta = target."""

    base_version: int
    encoding: int
    count: int
    base_checksum: int | None  # None: no base (a dense payload)
    target_checksum: int
    target_nbytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorInfo:
    """A tensor of a pushed checkpoint and where its bytes live."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    owner: RankRef
    store_offset: int
    path: str = ""
    file_offset: int = 0
    checksum: int | None = None  # ckpt_common.checksum from the host store; None: unknown
    # a box of the tensor (ckpt_common.pieces; shape stays the whole tensor's, nbytes and
    # checksum are the box's); None: the whole tensor
    piece: Piece | None = None
    # a delta store's payload of the tensor (nbytes and checksum are the payload's); None:
    # the tensor's own bytes
    delta: DeltaRef | None = None


_KEPT = tuple(f.name for f in fields(TensorInfo) if f.name != "checksum")
_kept = operator.attrgetter(*_KEPT)


def with_checksum(t: TensorInfo, checksum: int) -> TensorInfo:
    """dataclasses.replace(t, checksum=checksum), a few times as fast (a million tensors)."""
    return TensorInfo(**dict(zip(_KEPT, _kept(t), strict=True)), checksum=checksum)


@dataclass(kw_only=True, slots=True)
class Shard:
    owner: RankRef
    nbytes: int
    tensor_count: int
    state: ShardState = ShardState.LOADING
    segment: str = ""
    reason: str = ""
    p2p_session: str = ""  # transfer-engine session of the owner ("host:port"); "": none
    p2p_addr: int = 0  # address of the store's first byte in the owner's process


@dataclass(frozen=True, kw_only=True, slots=True)
class Probe:
    """The trainer's proof of a version (ckpt_daemon.engines.probes): prompt token ids and the
    greedy continuation, or each continuation token's log-prob (teacher-forced) within
    tolerance."""

    prompt: tuple[int, ...]
    expected: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    tolerance: float = 0.0


@dataclass(kw_only=True, slots=True)
class CheckpointVersion:
    name: str
    version: int
    state: CheckpointState
    tensors: list[TensorInfo]
    shards: dict[RankRef, Shard]
    created: float
    ready: float = 0.0
    reason: str = ""
    probe: Probe | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(kw_only=True, slots=True)
class DeviceInfo:
    index: int
    kind: str
    uuid: str
    total_bytes: int
    free_bytes: int
    ceilings: dict[str, float] = field(default_factory=dict)  # bytes/s per phase, measured


@dataclass(kw_only=True, slots=True)
class AgentInfo:
    node_id: str
    host: str
    devices: list[DeviceInfo]
    attached: bool
    last_seen: float
    version: str = ""
    pid: int = 0
    ipc_dir: str = ""
    host_free_bytes: int = 0  # host memory for stores, as last reported (0: unknown)


@dataclass(kw_only=True, slots=True)
class Instance:
    name: str
    kind: InstanceKind
    endpoint: str
    tp_size: int
    ranks: list[RankRef]
    checkpoint: str = ""
    version: int = 0
    ready: bool = False
    reason: str = ""
    # the job that may have left this instance on a mix (set while a job sends it bytes,
    # cleared when one succeeds): it is not ready, and ckptd restores checkpoint@version
    pending: str = ""
    # partial updates applied on top of checkpoint@version, in order (a restore replays
    # them): {"checkpoint", "version", "tensors"}
    overlays: list[dict] = field(default_factory=list)
    weight_transfer: str = ""  # vLLM: "ckptd" (native weight-transfer API) or "" (extension)
    layout: str = ""  # its engine's sharding layout (Registry.layout), "" until reported


@dataclass(kw_only=True, slots=True)
class PhaseTimes:
    copy_s: float = 0.0
    broadcast_s: float = 0.0
    reload_s: float = 0.0
    setup_s: float = 0.0
    total_s: float = 0.0


@dataclass(kw_only=True, slots=True)
class RankResult:
    rank: int
    owner: RankRef
    ok: bool
    reason: str = ""
    times: PhaseTimes = field(default_factory=PhaseTimes)
    bytes: int = 0  # through its group's collective
    engine_untouched: bool = False  # its engine was never told to load (False: unknown)
    copy_bytes: int = 0  # staged from host stores (its own buckets), in copy_s
    origin: FailureOrigin = FailureOrigin.UNSPECIFIED  # where its failure began (not ok)

    @property
    def own_failure(self) -> bool:
        """Failed by itself, not stopped by another rank or by ckptd."""
        return not self.ok and self.origin not in (FailureOrigin.PEER, FailureOrigin.DAEMON)


@dataclass(kw_only=True, slots=True)
class UpdateSpec:
    checkpoint: str
    version: int = 0
    ranks: list[int] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)
    method: str = "auto"  # auto (shard-aware where layouts are known) | broadcast | sharded | p2p
    bucket_bytes: int = 0
    tensors: list[str] = field(default_factory=list)
    timeout_s: float = 0.0
    rollback_of: str = ""  # this update restores engines after job `rollback_of` failed
    stream: bool = False  # may read a direct push still being written (UpdateRequest.stream)


@dataclass(kw_only=True, slots=True)
class Job:
    id: str
    kind: JobKind
    state: JobState
    spec: UpdateSpec
    created: float
    reason: str = ""
    version: int = 0  # resolved
    targets: list[RankRef] = field(default_factory=list)
    target_ranks: list[int] = field(default_factory=list)
    buckets_total: int = 0
    buckets_done: int = 0
    bytes_total: int = 0
    bucket_bytes: int = 0
    started: float = 0.0
    finished: float = 0.0
    first_bucket_s: float = 0.0
    results: list[RankResult] = field(default_factory=list)
    method: str = ""  # what it ran: broadcast | sharded | p2p ("" until planned)
    method_reason: str = ""  # why (auto's choice, or "<method>: requested")
    streamed: bool = False  # read the version while its push was still writing it
