"""Which network interface carries an address (IPv4, Linux): for libraries that bind by
interface name rather than address (NCCL's NCCL_SOCKET_IFNAME)."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFADDR = 0x8915


def interface_of(ip: str) -> str | None:
    """The name of the interface whose IPv4 address is `ip`; None if none (or not IPv4)."""
    try:
        want = socket.inet_aton(ip)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                addr = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)[20:24]
            except OSError:  # no IPv4 address on it
                continue
            if addr == want:
                return name
    return None
