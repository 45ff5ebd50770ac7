"""Where ckptctl writes. Tables and colors go through rich; colors only on a terminal (and
never with NO_COLOR), lines never folded (a long row runs on, as kubectl's do, and a pipe
gets whole lines). Plain text is written as is: API strings are never read as markup."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

_STYLES = {
    "SUCCEEDED": "green",
    "READY": "green",
    "ATTACHED": "green",
    "yes": "green",
    "FAILED": "red",
    "LOST": "red",
    "DETACHED": "red",
    "no": "red",
    "CANCELLED": "yellow",
    "RUNNING": "cyan",
    "LOADING": "cyan",
    "PENDING": "cyan",
}
_WIDE = 1 << 20  # columns: rich never folds a row


def console(stream: Any) -> Console:
    """A console on stream: its colors (if a terminal), without a width limit."""
    return Console(file=stream, width=_WIDE, highlight=False, soft_wrap=True)


def styled(state: str) -> Text:
    return Text(state, style=_STYLES.get(state, ""))


def markup(state: str) -> str:
    """state in rich markup with its color (for a progress bar's description)."""
    style = _STYLES.get(state)
    return f"[{style}]{state}[/]" if style else state


def table(
    header: list[str], rows: list[list[Any]], stream: Any = None, *, show_header: bool = True
) -> None:
    """Rows under a header, kubectl's way: columns two spaces apart, no borders. A cell is
    a str or a rich Text (a colored state)."""
    out = stream or sys.stdout
    con = console(out)
    t = Table(
        box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold",
        show_header=show_header,
    )  # fmt: skip
    for h in header:
        t.add_column(h, no_wrap=True)
    for r in rows:
        t.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in r))
    with con.capture() as cap:
        con.print(t)
    out.write("\n".join(line.rstrip() for line in cap.get().splitlines()) + "\n")
    out.flush()


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def age(unix: float, now: float) -> str:
    """kubectl-style age: 45s, 12m, 3h, 2d."""
    if not unix:
        return "-"
    s = max(0, int(now - unix))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"
