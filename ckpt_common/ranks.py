"""Rank-set syntax shared by the CLI and the API: "0-3,6,8-9"."""

from __future__ import annotations


def parse_ranks(text: str) -> list[int]:
    """Parse "0-3,6" into [0, 1, 2, 3, 6]. Raises ValueError on malformed input."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo_s, _, hi_s = part.partition("-")
            if not lo_s.isdigit() or not hi_s.isdigit():
                raise ValueError(f"bad rank range {part!r}")
            lo, hi = int(lo_s), int(hi_s)
            if hi < lo:
                raise ValueError(f"bad rank range {part!r}: end before start")
            out.update(range(lo, hi + 1))
        else:
            if not part.isdigit():
                raise ValueError(f"bad rank {part!r}")
            out.add(int(part))
    if not out:
        raise ValueError("empty rank set")
    return sorted(out)


def format_ranks(ranks: list[int]) -> str:
    """The inverse of parse_ranks: [0, 1, 2, 3, 6] -> "0-3,6"."""
    items = sorted(set(ranks))
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
