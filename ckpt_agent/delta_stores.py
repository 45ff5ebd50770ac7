"""A device's delta stores (ckpt_common.delta): made from two versions it holds (`make`, the
Diff command: ckptd diffs a pushed version against the one its engines serve), or written by
a trainer that computed the delta on its GPU, and then applied to the base's store to make
the full version (`patch`, the Patch command).

In a Diff, an item with base_offset < 0 has no counterpart in the base (a new tensor,
another owner): it goes in dense, so the delta store alone feeds an update of the whole
version."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import shm
from ckpt_agent.host_store import HostStore, Store, StoreError, load_threads
from ckpt_common import checksum, delta

ALIGN = 256  # as the planner's (ckpt_daemon.plan.placement.ALIGN): every payload view aligned


def _view(s: Store) -> Any:
    import torch

    return torch.frombuffer(shm.buffer(s.mem), dtype=torch.uint8)[: s.nbytes]


def _check(it: apb.DiffItem, base: Store, target: Store) -> None:
    n = int(it.nbytes)
    if it.itemsize not in (1, 2, 4, 8) or n < 0 or n % it.itemsize:
        raise StoreError("INVALID_ARGUMENT", f"a diff item of {n} bytes of {it.itemsize}")
    if it.target_offset < 0 or it.target_offset + n > target.nbytes:
        raise StoreError("INVALID_ARGUMENT", "a diff item lies beyond the target's store")
    if it.base_offset >= 0 and it.base_offset + n > base.nbytes:
        raise StoreError("INVALID_ARGUMENT", "a diff item lies beyond the base's store")


def _encode(bv: Any, tv: Any, it: apb.DiffItem) -> delta.Encoded:
    t = tv[it.target_offset : it.target_offset + it.nbytes]
    if it.base_offset < 0:
        return delta.Encoded(delta.Encoding.DENSE, it.nbytes // it.itemsize, t)
    b = bv[it.base_offset : it.base_offset + it.nbytes]
    return delta.encode(b, t, it.itemsize)


def _encode_all(bv: Any, tv: Any, items: list[apb.DiffItem]) -> list[delta.Encoded]:
    with ThreadPoolExecutor(load_threads(), thread_name_prefix="diff") as ex:
        return list(ex.map(lambda it: _encode(bv, tv, it), items))


def make(stores: HostStore, d: apb.Diff, pin: Any = None) -> apb.DiffDone:
    """Computes d's deltas into the delta store (ckpt_common.delta.store_name(checkpoint,
    base), version), replacing one made before; pin: the backend's store pinning."""
    t0 = time.monotonic()
    base, target = stores.get(d.checkpoint, d.base), stores.get(d.checkpoint, d.version)
    for it in d.items:
        _check(it, base, target)
    encoded = _encode_all(_view(base), _view(target), list(d.items))
    offsets, total = [], 0
    for e in encoded:
        offsets.append(total)
        total += -(-e.payload.numel() // ALIGN) * ALIGN
    if d.max_nbytes and total > d.max_nbytes:
        raise StoreError("FAILED_PRECONDITION", f"a delta of {total} bytes would not pay")
    key = delta.store_name(d.checkpoint, d.base)
    ready = stores.load(apb.Load(checkpoint=key, version=d.version, device=d.device, nbytes=total))
    out = _view(stores.get(key, d.version))
    done = apb.DiffDone(segment=ready.segment, nbytes=total)
    for e, off in zip(encoded, offsets, strict=True):
        n = e.payload.numel()
        out[off : off + n].copy_(e.payload)
        done.entries.append(
            apb.DiffEntry(
                encoding=int(e.encoding), count=e.count, offset=off, nbytes=n,
                checksum=checksum.of_numpy(out[off : off + n].numpy()),
            )
        )  # fmt: skip
    del encoded, out  # views of the stores: the segments may be closed later
    if pin is not None:
        pin(stores.get(key, d.version))
    done.seconds = time.monotonic() - t0
    return done


def _check_patch(it: apb.PatchItem, base: Store, deltas: Store) -> None:
    n, dn = int(it.nbytes), int(it.delta_nbytes)
    if it.itemsize not in (1, 2, 4, 8) or n < 0 or dn < 0 or n % it.itemsize:
        raise StoreError("INVALID_ARGUMENT", f"a patch item of {n} bytes of {it.itemsize}")
    if it.offset < 0 or it.offset + n > base.nbytes:
        raise StoreError("INVALID_ARGUMENT", "a patch item lies beyond the base's store")
    if it.delta_offset < 0 or it.delta_offset + dn > deltas.nbytes:
        raise StoreError("INVALID_ARGUMENT", "a patch item's delta lies beyond its store")


def _apply(tv: Any, dv: Any, it: apb.PatchItem) -> str:
    """Applies one item in place; why it failed, or ""."""
    out = tv[it.offset : it.offset + it.nbytes]
    payload = dv[it.delta_offset : it.delta_offset + it.delta_nbytes]
    try:
        delta.apply(out, it.encoding, it.count, payload, it.itemsize)
    except delta.DeltaError as e:
        return str(e)
    if checksum.of_numpy(out.numpy()) != it.target_checksum:
        return "base + delta is not the target's bytes (its checksum differs)"
    return ""


def patch(stores: HostStore, p: apb.Patch) -> apb.StoreReady:
    """Makes (checkpoint, version) as a copy of (checkpoint, base) with every item's delta
    applied and checked; nothing is kept if any item fails."""
    t0 = time.monotonic()
    base = stores.get(p.checkpoint, p.base)
    deltas = stores.get(delta.store_name(p.checkpoint, p.base), p.version)
    for it in p.items:
        _check_patch(it, base, deltas)
    ready = stores.load(
        apb.Load(checkpoint=p.checkpoint, version=p.version, device=p.device, nbytes=base.nbytes)
    )
    problems = _patch_into(
        _view(stores.get(p.checkpoint, p.version)), _view(base), _view(deltas), list(p.items)
    )
    bad = [(i, why) for i, why in enumerate(problems) if why]
    if bad:
        stores.drop(p.checkpoint, p.version)
        i, why = bad[0]
        raise StoreError("DATA_LOSS", f"{len(bad)} deltas do not apply, e.g. item {i}: {why}")
    ready.seconds = time.monotonic() - t0
    return ready


def _patch_into(tv: Any, bv: Any, dv: Any, items: list[apb.PatchItem]) -> list[str]:
    chunk = 64 << 20
    with ThreadPoolExecutor(load_threads(), thread_name_prefix="patch") as ex:
        spans = [(o, min(o + chunk, bv.numel())) for o in range(0, bv.numel(), chunk)]
        list(ex.map(lambda s: tv[s[0] : s[1]].copy_(bv[s[0] : s[1]]), spans))
        return list(ex.map(lambda it: _apply(tv, dv, it), items))
