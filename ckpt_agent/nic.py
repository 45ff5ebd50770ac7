"""Which RDMA NIC(s) a device's transfer engine uses. Pure parsing, tested on CPU.

Two ways to say it, checked in this order:

- CKPT_P2P_NICS, an explicit map: "0=mlx5_0,1=mlx5_0,2=mlx5_1,3=mlx5_1" (device index =
  NIC; several NICs for one device with '+': "0=mlx5_0+mlx5_1").
- NCCL_IB_HCA semantics (what NCCL users already set): a comma list of HCA names with an
  optional ":port" ("mlx5_0:1,mlx5_1:1"); a leading '^' excludes the listed HCAs from those
  found; a leading '=' means exact names (prefix match otherwise). Devices are spread over
  the chosen NICs round-robin: device i gets nics[i % len(nics)].

Empty result: let Mooncake discover every usable NIC itself (and use TCP when it finds none).
"""

from __future__ import annotations

NICS_ENV = "CKPT_P2P_NICS"
NCCL_HCA_ENV = "NCCL_IB_HCA"


def parse_explicit(spec: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for item in spec.replace(" ", "").split(","):
        if not item:
            continue
        dev, sep, nics = item.partition("=")
        if not sep or not dev.isdigit() or not nics:
            raise ValueError(f"bad {NICS_ENV} entry {item!r}: want DEVICE=NIC[+NIC]")
        out[int(dev)] = [n for n in nics.split("+") if n]
    return out


def parse_nccl_hca(spec: str, available: list[str]) -> list[str]:
    """The HCAs NCCL would use given NCCL_IB_HCA and the HCAs present."""
    spec = spec.strip()
    if not spec:
        return list(available)
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    spec = spec.lstrip("=")
    names = [x.split(":", 1)[0] for x in spec.split(",") if x]

    def match(hca: str) -> bool:
        return any(hca == n if exact else hca.startswith(n) for n in names)

    if exclude:
        return [h for h in available if not match(h)]
    if not available:  # nothing discovered: trust the list as given
        return names
    return [h for h in available if match(h)]


def nics_for_device(device: int, env: dict[str, str], available: list[str]) -> list[str]:
    explicit = env.get(NICS_ENV, "")
    if explicit:
        table = parse_explicit(explicit)
        if device not in table:
            raise ValueError(f"{NICS_ENV} names no NIC for device {device}")
        return table[device]
    chosen = parse_nccl_hca(env.get(NCCL_HCA_ENV, ""), available)
    if not chosen:
        return []
    return [chosen[device % len(chosen)]]


def available_hcas(sysfs: str = "/sys/class/infiniband") -> list[str]:
    import os

    try:
        return sorted(os.listdir(sysfs))
    except OSError:
        return []
