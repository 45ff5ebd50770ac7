"""Every command-line flag of a program also settable by environment: `--drain-s 5` or
PREFIX_DRAIN_S=5 (the flag wins). Names a client-side variable already uses are renamed
(ckptd's own --tls-cert is CKPTD_SERVER_TLS_CERT: CKPTD_TLS_CERT is the certificate clients
and agents show ckptd)."""

from __future__ import annotations

import argparse
import os

TRUE = {"1", "true", "yes", "on"}


def env_name(prefix: str, action: argparse.Action, renamed: dict[str, str]) -> str:
    flag = next(o for o in action.option_strings if o.startswith("--"))
    return renamed.get(flag) or prefix + flag[2:].upper().replace("-", "_")


def apply_env_defaults(
    p: argparse.ArgumentParser, prefix: str, renamed: dict[str, str] | None = None
) -> dict[str, str]:
    """Sets each flag's default from its variable where that is set; returns flag -> name."""
    names: dict[str, str] = {}
    for action in p._actions:  # argparse has no public iterator over its actions
        if not any(o.startswith("--") for o in action.option_strings) or action.dest == "help":
            continue
        name = env_name(prefix, action, renamed or {})
        names[action.option_strings[-1]] = name
        raw = os.environ.get(name)
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            value: object = raw.strip().lower() in TRUE
        elif action.type is not None:
            try:
                value = action.type(raw)  # type: ignore[misc]
            except (TypeError, ValueError):
                p.error(f"{name}={raw!r}: not a valid value for {action.option_strings[-1]}")
        else:
            value = raw
        if action.choices is not None and value not in action.choices:
            p.error(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        p.set_defaults(**{action.dest: value})
    return names
