"""Who may be at the other end of a local rendezvous (the IPC directory and its sockets,
shared-memory segments), and the checks that say so.

Trusted uids are this process's own, root's (both can already change this process) and the
ones the operator names in CKPT_IPC_PEER_UIDS (comma-separated uids or user names: the
agent's uid on an engine that runs as another user, the engine's on the agent). A
rendezvous is trusted only when a trusted uid owns it and nobody else can write it or any
directory above it (a sticky directory such as /tmp protects what its entries' owners put
there); links are never followed for the thing itself. The peer of a socket is checked on
every message through the kernel's credentials of the connection (SO_PEERCRED, which
libzmq reports as a frame's "Peer-Address": "localhost:<uid>:<gid>:<pid>").
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterable
from typing import Any

PEER_UIDS_ENV = "CKPT_IPC_PEER_UIDS"
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its NUL


class RendezvousError(Exception):
    """A local rendezvous that must not be used; the message says why."""


def parse_uids(raw: str) -> frozenset[int]:
    """'1000,svc' -> {1000, uid of svc}. ValueError names an entry that is neither."""
    out = set()
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        if item.isdigit():
            out.add(int(item))
            continue
        try:
            out.add(pwd.getpwnam(item).pw_uid)
        except KeyError:
            raise ValueError(f"{PEER_UIDS_ENV}: {item!r} is neither a uid nor a user") from None
    return frozenset(out)


def configured_uids() -> frozenset[int]:
    try:
        return parse_uids(os.environ.get(PEER_UIDS_ENV, ""))
    except ValueError as e:
        raise RendezvousError(str(e)) from None


def trusted_uids() -> frozenset[int]:
    """This process's uid, root, and the operator's CKPT_IPC_PEER_UIDS."""
    return frozenset({os.geteuid(), 0}) | configured_uids()


def others_allowed() -> bool:
    """Whether the operator trusts a uid other than ours and root's: sockets must then be
    reachable by other users, and the peer check alone decides who is heard."""
    return bool(configured_uids() - {os.geteuid(), 0})


def stat_refusal(st: os.stat_result, trusted: Iterable[int], what: str) -> str:
    """Why `what` (described by its stat) is not trusted, or ""."""
    uids = sorted(set(trusted))
    if st.st_uid not in uids:
        return f"{what} is owned by uid {st.st_uid}, not by a trusted uid {uids}"
    if st.st_mode & OTHERS_WRITE:
        return f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _ancestor_refusal(path: str, trusted: frozenset[int]) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid not in trusted:
        return f"{path} is owned by uid {st.st_uid}, not by a trusted uid {sorted(trusted)}"
    if st.st_mode & OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
        return f"{path} is writable by others without the sticky bit"
    return ""


def _prefixes(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def parents_refusal(path: str, trusted: Iterable[int]) -> str:
    """Why someone untrusted could replace `path` through a directory above it, or "": every
    directory above it, and above what each link on the way resolves to, is owned by a
    trusted uid (or root) and writable by nobody else unless sticky; every such link is
    owned by a trusted uid."""
    uids = frozenset(trusted) | {0}
    seen: set[str] = set()
    lexical = _prefixes(os.path.abspath(path))[:-1]
    for i, p in enumerate(lexical):
        for q in _prefixes(os.path.realpath(p)):
            if q not in seen:
                seen.add(q)
                why = _ancestor_refusal(q, uids)
                if why:
                    return why
        if i and os.path.islink(p) and os.lstat(p).st_uid not in uids:
            return f"{p} is a link owned by uid {os.lstat(p).st_uid}"
    return ""


def dir_refusal(path: str, trusted: Iterable[int]) -> str:
    """Why the directory `path` must not be used as a rendezvous, or "": it must be a
    directory (not a link to one), owned by a trusted uid, writable by nobody else, with
    safe parents."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    return stat_refusal(st, trusted, path) or parents_refusal(path, trusted)


def ensure_private_dir(path: str, mode: int = 0o700) -> str:
    """Creates `path` for this uid alone (mode 0700, or 0711 to let other users reach
    sockets whose peer is checked), or takes the one this uid made before. Refuses
    (RendezvousError) one owned by anyone else or writable by anyone else, a link, or one
    under a directory others could swap it from. Returns its real path."""
    path = os.path.abspath(path)
    me = frozenset({os.geteuid()})
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    why = parents_refusal(path, me)
    if why:
        raise RendezvousError(f"private dir {path}: {why}")
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RendezvousError(
            f"private dir {path}: {e.strerror} (a link or not a directory)"
        ) from None
    try:
        why = stat_refusal(os.fstat(fd), me, f"private dir {path}")
        if why:
            raise RendezvousError(f"{why}: refused (remove it, or choose another directory)")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return os.path.realpath(path)


def peer_uid(frame: Any) -> int | None:
    """The uid of the process that sent a ZMQ frame over ipc:// (its connection's
    SO_PEERCRED), or None when the transport has none."""
    try:
        addr = frame.get("Peer-Address")
    except Exception:
        return None
    parts = str(addr).split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return int(parts[1])


def peer_refusal(frame: Any, trusted: Iterable[int]) -> str:
    """Why the sender of `frame` is not to be heard, or ""."""
    uid = peer_uid(frame)
    uids = sorted(set(trusted))
    if uid is None:
        return "the peer's credentials are unknown (not an ipc:// connection)"
    if uid not in uids:
        return f"the peer runs as uid {uid}, not as a trusted uid {uids}"
    return ""
