"""Which network interface a node talks to the rendezvous host through (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).

NCCL and gloo pick an interface by themselves, and on nodes with several (management Ethernet,
docker bridges, the fast fabric) they may pick one that cannot reach the other nodes. Primus picks,
on each node, the interface whose route leads to the master address: the most specific route of
`/proc/net/route`, else the interface holding the local address a UDP socket "connected" to the
master would use. A variable the user set (shell or the experiment's `env:`) is kept.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from pathlib import Path

ROUTE_FILE = Path("/proc/net/route")
IFNAME_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def _ipv4(host: str) -> str | None:
    try:
        socket.inet_aton(host)
        if host.count(".") == 3:
            return host
    except OSError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


def _from_route_table(ip: str) -> str | None:
    try:
        lines = ROUTE_FILE.read_text().splitlines()[1:]
    except OSError:
        return None
    (addr,) = struct.unpack("<I", socket.inet_aton(ip))  # the table's own byte order
    best: tuple[int, int, str] | None = None  # (-prefix length, metric, interface)
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            iface, dest, flags, metric, mask = fields[0], int(fields[1], 16), int(fields[3], 16), int(fields[6]), \
                int(fields[7], 16)
        except ValueError:
            continue
        if not flags & 0x1 or (addr & mask) != dest:  # RTF_UP
            continue
        key = (-bin(mask).count("1"), metric, iface)
        if best is None or key < best:
            best = key
    return best[2] if best else None


def _interface_of_address(local_ip: str) -> str | None:
    import fcntl

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        if socket.inet_ntoa(packed[20:24]) == local_ip:
            return name
    return None


def _from_udp_connect(ip: str) -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))  # no packet is sent: this only asks the kernel for the route
            local = s.getsockname()[0]
    except OSError:
        return None
    return _interface_of_address(local)


def route_interface(master_addr: str) -> str | None:
    """The interface that leads to `master_addr` from this node, or None when it cannot be told."""
    ip = _ipv4(master_addr)
    if ip is None:
        return None
    if ip.startswith("127."):
        return "lo"
    return _from_route_table(ip) or _from_udp_connect(ip)


def socket_ifname_env(master_addr: str, environ: Mapping[str, str],
                      experiment_env: Mapping[str, object] | None = None) -> dict[str, str]:
    """NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for a multi-node job, those not already set."""
    missing = [v for v in IFNAME_VARS if v not in environ and v not in (experiment_env or {})]
    if not missing:
        return {}
    iface = route_interface(master_addr)
    return {v: iface for v in missing} if iface else {}
