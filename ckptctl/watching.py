"""`get KIND -w` (and `watch KIND`): the list once, then each row that changes, as kubectl's
`get -w` prints them, until Ctrl-C (which ends it: exit 0). Columns that move on their own
(AGE, HEARD, FREE) do not count as changes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from ckptctl.output import plain, render
from ckptctl.term import table
from ckptctl.views import rows

VOLATILE_COLUMNS = {"AGE", "HEARD", "FREE"}
VOLATILE_FIELDS = {"last_seen_unix", "free_bytes"}
KEY_COLUMNS = {"checkpoints": 2, "jobs": 1, "agents": 3, "instances": 1}


def _stable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _stable(v) for k, v in x.items() if k not in VOLATILE_FIELDS}
    if isinstance(x, list):
        return [_stable(v) for v in x]
    return x


class ListWatch:
    def __init__(self, kind: str, fmt: str) -> None:
        self.kind, self.fmt = kind, fmt
        self._seen: dict[Any, Any] = {}
        self._header_shown = False

    def _changed_objects(self, items: list[Any]) -> list[Any]:
        out = []
        for x in items:
            d = plain(x)
            key = render(_stable(d), "json")
            if key not in self._seen:
                self._seen[key] = True
                out.append(d)
        return out

    def _changed_rows(self, items: list[Any]) -> tuple[list[str], list[list[Any]]]:
        header, body = rows(self.kind, items, wide=self.fmt == "wide")
        keep = [i for i, h in enumerate(header) if h not in VOLATILE_COLUMNS]
        nkey = KEY_COLUMNS[self.kind]
        out = []
        for r in body:
            key = tuple(str(c) for c in r[:nkey])
            value = tuple(str(r[i]) for i in keep)
            if self._seen.get(key) != value:
                self._seen[key] = value
                out.append(r)
        return header, out

    def show(self, items: list[Any]) -> None:
        if self.fmt in ("json", "yaml"):
            for d in self._changed_objects(items):
                print(render(d, self.fmt), flush=True)
            return
        header, changed = self._changed_rows(items)
        if changed or not self._header_shown:
            table(header, changed, sys.stdout, show_header=not self._header_shown)
            self._header_shown = True


def watch_list(fetch: Callable[[], list[Any]], kind: str, fmt: str, interval_s: float) -> int:
    w = ListWatch(kind, fmt)
    try:
        while True:
            w.show(fetch())
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
