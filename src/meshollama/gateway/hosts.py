"""Which ``Host`` headers the gateway answers, against DNS rebinding (pure).

A web page on ``evil.example`` can point its own name at 127.0.0.1 and then
call a loopback gateway "same-origin", past CORS: only the ``Host`` header
still says ``evil.example``. So, as Ollama's ``allowedHostsMiddleware``
does, a gateway bound to loopback answers only local names: no Host,
``localhost``, this machine's hostname, ``*.localhost``/``*.local``/
``*.internal``, and IP literals that are loopback, private, unspecified or
one of this machine's addresses. ``gateway.allowed_hosts`` adds names
(``*.example.com`` is any subdomain of example.com); ``*`` turns the check
off. A gateway on another address checks nothing unless names are
configured (then it checks them, plus the local names), since there the
right names are unknowable (a LAN IP, a DNS name, a port forward).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
# Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193, nothing more.
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def split_host(header: str) -> str:
    """The name or address of a Host header value: port, brackets and a final dot removed, lower case."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.removesuffix(".")


def _ip(host: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _local_ip(addr: IPAddress) -> bool:
    return addr.is_loopback or addr.is_unspecified or any(addr in net for net in _PRIVATE)


def machine_addresses() -> frozenset[str]:
    """This machine's interface addresses, as Ollama's isLocalIP looks them up."""
    try:
        import psutil

        return frozenset(a.address.partition("%")[0].lower() for addrs in psutil.net_if_addrs().values()
                         for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    except Exception:  # an odd platform: only the generic local ranges count
        return frozenset()


def bind_is_loopback(listen: str) -> bool:
    """True for a ``gateway.listen`` on 127.0.0.0/8, ::1 or localhost."""
    host = listen.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    addr = _ip(host)
    return addr is not None and addr.is_loopback


class HostPolicy:
    """``allowed(host_header)`` for one gateway."""

    def __init__(self, *, loopback: bool, extra: Iterable[str] = (), hostname: str | None = None,
                 addresses: Callable[[], frozenset[str]] = machine_addresses) -> None:
        extra = tuple(e.lower() if e.startswith("*") else split_host(e) for e in extra)
        self.off = "*" in extra or (not loopback and not extra)
        self._names = frozenset(e for e in extra if not e.startswith("*."))
        self._suffixes = tuple(e[1:] for e in extra if e.startswith("*."))  # "*.a.b" -> ".a.b"
        self._hostname = (socket.gethostname() if hostname is None else hostname).lower()
        self._addresses = addresses

    @classmethod
    def for_config(cls, gateway: object) -> HostPolicy:
        return cls(loopback=bind_is_loopback(gateway.listen), extra=gateway.allowed_hosts or ())  # type: ignore[attr-defined]

    def allowed(self, header: str | None) -> bool:
        if self.off:
            return True
        host = split_host(header or "")
        if host in ("", "localhost") or host == self._hostname or host in self._names:
            return True
        if host.endswith(LOCAL_SUFFIXES) or host.endswith(self._suffixes):
            return True
        addr = _ip(host)
        # This machine's own public address is local too; looked up only then, it costs a syscall.
        return addr is not None and (_local_ip(addr) or str(addr) in self._addresses())
