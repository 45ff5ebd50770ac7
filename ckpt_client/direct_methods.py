"""The Client's direct pushes: a trainer's tensors copied from its own memory into the host
stores of its node's agent (one part, a part of a sharded push, or streamed into an update
already running), and the segments those copies map."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import CkptError


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


class DirectPushMethods:
    """Mixed into Client: it provides _call, _stub, timeout_s and the segment cache."""

    _segments: Any
    _segments_lock: threading.Lock
    last_push: PushTimes | None
    push_streams: int
    timeout_s: float

    def _call(
        self, name: str, request: Any, timeout_s: float | None = None, stub: Any = None
    ) -> Any:
        raise NotImplementedError

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

    def push_delta(
        self,
        name: str,
        version: int,
        base: int,
        deltas: Sequence[Any],
        *,
        node_id: str,
        threads: int = 16,
        streams: int | None = None,
        timeout_s: float = 600.0,
        probe: tpb.Probe | None = None,
        early: bool = False,
    ) -> tpb.Checkpoint:
        """Pushes version as a delta from `base` (ckpt_trainer.deltas.DeltaItem, one per
        tensor of the base, computed where the trainer's tensors are): only the payloads are
        copied into this node's host stores; ckptd makes the full version from the base's
        and checks every tensor against its declared target checksum. Returns the READY
        version (early: the LOADING one, made in the background, CommitPushRequest.early);
        an update of engines serving `base` then moves only the payloads."""
        from ckpt_client.direct_push import write_items

        t0 = time.monotonic()
        metas = [d.meta(base) for d in deltas]
        req = cpb.BeginPushRequest(
            name=name, version=version, node_id=node_id, tensors=metas, timeout_s=timeout_s,
            probe=probe, delta_base=base,
        )  # fmt: skip
        plan = self._call("BeginPush", req, timeout_s + 30)
        t1 = time.monotonic()
        sums, stats = write_items(
            plan, [d.payload for d in deltas], self.segments, threads=threads,
            streams=streams or self.push_streams,
        )  # fmt: skip
        t2 = time.monotonic()
        commit = cpb.CommitPushRequest(name=name, version=version, checksums=sums, early=early)
        cp = self._call("CommitPush", commit, timeout_s + 30)
        self.last_push = PushTimes(
            begin_s=t1 - t0, write_s=t2 - t1, commit_s=time.monotonic() - t2,
            map_s=stats.map_s, copy_s=stats.copy_s, bytes=stats.bytes,
            newly_pinned=stats.newly_pinned, trainer_checksums=True,
        )  # fmt: skip
        return cp

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
