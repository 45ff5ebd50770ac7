"""Per-instance engine keys, from ckptd's master secret (`--engine-token-file`).

    ckptd engine-key --master /etc/ckpt/engine.token --instance actor-0 --out /etc/ckpt/actor-0.key

writes the key of instance `actor-0` (0600): its engine reads it from CKPT_ENGINE_TOKEN_FILE
(vllm_ext.guard). An instance's key opens that instance's engine only; the master never
leaves ckptd's host, and no key is ever sent over the network (ckpt_common.engine_auth).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from ckpt_common.engine_auth import instance_key

MIN_MASTER = 16  # bytes of secret a master must hold


@dataclass(frozen=True)
class EngineKeys:
    master: bytes

    def __post_init__(self) -> None:
        if len(self.master) < MIN_MASTER:
            raise ValueError(f"the engine master secret must hold at least {MIN_MASTER} bytes")

    def key(self, instance: str) -> bytes:
        return instance_key(self.master, instance)


def load_keys(path: str) -> EngineKeys | None:
    """The keys of a master file; None without one (engines then get no credentials)."""
    if not path:
        return None
    with open(path, "rb") as f:
        return EngineKeys(f.read().strip())


def write_key(master_file: str, instance: str, out: str) -> None:
    keys = load_keys(master_file)
    if keys is None:
        raise ValueError("the master file is required")
    data = keys.key(instance) + b"\n"
    if out == "-":
        os.write(1, data)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(out, 0o600)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ckptd engine-key", description=__doc__.split("\n\n")[0])
    p.add_argument("--master", required=True, help="ckptd's --engine-token-file")
    p.add_argument("--instance", required=True, help="the instance's name, as registered")
    p.add_argument("--out", required=True, help="write the key here (0600); - for stdout")
    a = p.parse_args(argv)
    try:
        write_key(a.master, a.instance, a.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"ckptd engine-key: {e}") from None


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
