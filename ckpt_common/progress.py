"""The progress mark of a store being written by a direct push: how many of its bytes, from
offset 0, the trainer has written, so an update can stream from the push (read a bucket as
soon as its bytes have landed) instead of waiting for the commit.

The mark is one little-endian uint64 in the last TRAILER bytes of the store's segment
(every segment is allocated at least TRAILER bytes larger than its store). The agent zeroes
it when it hands the segment out for a version; the trainer raises it as its copies finish
(in store order), and sets DONE once everything is written. Only the trainer writes it, only
the owner's worker reads it. A mark that lies makes an update read bytes not yet written:
the engines' checksums (declared by the trainer before the update) catch that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

TRAILER = 64  # bytes at the end of every store segment; the mark is its first 8
DONE = (1 << 63) - 1  # every byte of the store is written


def _word(buf: Any) -> Any:
    """The mark as a one-element uint64 numpy array over the segment's buffer."""
    import numpy as np

    size = len(buf) if not hasattr(buf, "nbytes") else buf.nbytes
    if size < TRAILER:
        raise ValueError(f"a {size}-byte segment has no room for a progress mark")
    return np.frombuffer(buf, dtype="<u8", count=1, offset=size - TRAILER)


def read(buf: Any) -> int:
    """The mark of a segment (its whole mapping: a memoryview, mmap or numpy array)."""
    return int(_word(buf)[0])


def write(buf: Any, value: int) -> None:
    _word(buf)[0] = value


class Marks:
    """The trainer's side: pieces (segment index, end offset in the store) complete in any
    order; each segment's mark is raised to the end of its longest completed prefix of
    pieces (in the order given, which is the store's), and to DONE once all of its pieces
    are in. `write(segment index, value)` puts a mark."""

    def __init__(self, pieces: Sequence[tuple[int, int]], put: Callable[[int, int], None]):
        self._pieces = list(pieces)
        self._put = put
        self._done = [False] * len(self._pieces)
        self._lock = threading.Lock()
        self._order: dict[int, list[int]] = {}  # segment -> its piece indices, in order
        for i, (seg, _) in enumerate(self._pieces):
            self._order.setdefault(seg, []).append(i)
        self._next = dict.fromkeys(self._order, 0)  # segment -> first incomplete position

    def complete(self, i: int) -> None:
        """Piece i's bytes are in host memory (its copy has finished)."""
        with self._lock:
            self._done[i] = True
            seg = self._pieces[i][0]
            order, k = self._order[seg], self._next[seg]
            while k < len(order) and self._done[order[k]]:
                k += 1
            if k == self._next[seg]:
                return
            self._next[seg] = k
            self._put(seg, DONE if k == len(order) else self._pieces[order[k - 1]][1])

    def finish(self, segments: int) -> None:
        """Every segment's mark (0..segments-1, also one that got no piece) to DONE."""
        with self._lock:
            for seg in range(segments):
                self._put(seg, DONE)
