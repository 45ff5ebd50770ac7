"""Whose permissions a push's file reads follow: the agent reads as root (or its own user) on
a principal's behalf, so it must read only what that principal could read itself.

A Reader is a local uid (with the groups the node's user database gives it), or nobody in
particular (`ANYONE`: a principal with no uid configured, or ckptd with --insecure), who may
read only what every user may. The decision is the kernel's mode-bit rule on the inode the
agent has opened (owner, else group, else other bits; uid 0 may read everything); POSIX
ACLs are not consulted (a file readable only through an ACL entry is refused). A file with
more than one hard link that the reader does not own is refused: a link can make a file
reachable that the directories above its other name hide.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass, field

R, X = 4, 1  # the read and search (execute) bits of one class


@dataclass(frozen=True)
class Reader:
    uid: int | None  # None: nobody in particular (only what everyone may)
    gids: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def of_uid(cls, uid: int | None) -> Reader:
        """The reader for a local uid, its groups from the user database (none when the
        uid has no entry: then only its owner bits and everyone's count)."""
        if uid is None:
            return ANYONE
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid)
        try:
            groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
        except OSError:
            groups = {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
        return cls(uid, frozenset(groups | {pw.pw_gid}))

    @property
    def who(self) -> str:
        return "everyone" if self.uid is None else f"uid {self.uid}"

    def may(self, st: os.stat_result, want: int) -> bool:
        """Whether this reader has the `want` bits (R, X, R | X) on the inode `st`."""
        if self.uid == 0:
            return True
        mode = st.st_mode
        if self.uid is not None and st.st_uid == self.uid:
            bits = (mode >> 6) & 7
        elif self.uid is not None and st.st_gid in self.gids:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        return bits & want == want

    def refusal(self, st: os.stat_result, want: int, shown: str) -> str:
        """Why this reader may not have `want` on `shown` (the opened inode `st`); ""."""
        is_dir = stat.S_ISDIR(st.st_mode)
        if not self.may(st, want):
            if is_dir and want == X:
                return f"{self.who} may not search directory {shown}"
            what = "list directory" if is_dir else "read"
            return f"{self.who} may not {what} {shown}"
        if not is_dir and st.st_nlink > 1 and self.uid != 0 and st.st_uid != self.uid:
            return (
                f"{shown} has {st.st_nlink} hard links and is not {self.who}'s own file "
                "(a link may reach a file its directory hides)"
            )
        return ""


ANYONE = Reader(None)
ROOT = Reader(0)
