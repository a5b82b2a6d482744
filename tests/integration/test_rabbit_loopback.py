"""The local RabbitMQ node (`./pt up`, the tests) listens on loopback only: AMQP and the
Erlang distribution port (anyone who reaches that one with the cookie runs code on the node).
Read from the kernel's socket tables (what `ss -ltn` shows) on a real node."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from harness.rabbitmq import RabbitNode

LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket listening on `port` (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.split(":")
            if state != LISTEN or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(addr_hex)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(words)))
    return found


def test_amqp_and_distribution_ports_listen_on_loopback_only(rabbit: RabbitNode) -> None:
    assert listening_addresses(rabbit.port) == {"127.0.0.1"}
    assert listening_addresses(rabbit.dist_port) == {"127.0.0.1"}, "Erlang distribution must not face the network"
    assert listening_addresses(4369) & {"127.0.0.1", "0.0.0.0", "::"}, "the parser reads epmd's socket"
