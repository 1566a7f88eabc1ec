"""Which addresses we advertise, which of a peer's addresses we trust and dial (pure).

A node that listens on ``0.0.0.0`` must tell others an address they can reach.
The old code advertised ``127.0.0.1`` plus whatever ``gethostname()`` resolved
to (usually ``127.0.1.1`` on Debian), so on a real LAN every peer dialled
itself. The rules here, all pure functions over strings and IP objects so they
are tested with tables of cases:

* :func:`advertise`: a wildcard listen address expands to every up interface
  address (from :func:`interface_ips`, psutil), LAN addresses first, then
  public ones, IPv4 before IPv6; loopback and link-local addresses are left out
  unless the node has nothing else (a laptop with no network still works
  alone). Addresses other peers observed for us (identify, once confirmed) are
  added; ``--announce`` replaces the lot.
* :func:`check_announced`: an announcement's addresses are kept only if they
  parse, are not wildcards, and end in the announcer's own ``/p2p/<id>``; the
  rest are dropped and counted (:class:`Checked`), never dialled.
* :func:`dial_plan`: the order we dial a peer in: direct addresses (never our
  own, loopback and link-local only for a peer on this host), then relay
  (``/p2p-circuit``) addresses.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import multiaddr

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_ADVERTISED = 16  # what we put in our own announcements and identify
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # base58btc, the text form of a libp2p peer id


def is_peer_id(text: object) -> bool:
    """Whether ``text`` has the shape of a peer id (a claim from a stranger, before any use)."""
    return isinstance(text, str) and PEER_ID.fullmatch(text) is not None

_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier NAT / Tailscale: a LAN to us


class Scope(enum.IntEnum):
    """How far an IP reaches. The value is the advertising order (lower first)."""

    LAN = 0  # RFC 1918, ULA, CGNAT, 198.18/15: other machines nearby
    PUBLIC = 1
    LOOPBACK = 2  # this host only
    LINK_LOCAL = 3  # this link only, and needs a zone: not advertised
    UNSPECIFIED = 4  # 0.0.0.0 / ::, multicast, broadcast, 0/8, reserved: never a peer's address

_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def unmapped(ip: IP) -> IP:
    """``::ffff:a.b.c.d`` is the IPv4 address a.b.c.d (so it matches our own)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def scope(ip: IP) -> Scope:
    ip = unmapped(ip)
    if ip.is_loopback:
        return Scope.LOOPBACK
    if ip.is_link_local:
        return Scope.LINK_LOCAL
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or (ip.version == 4 and ip in _THIS_NETWORK):
        return Scope.UNSPECIFIED
    if ip.is_private or ip in _CGNAT:
        return Scope.LAN
    return Scope.PUBLIC


@dataclass(frozen=True)
class Parsed:
    """A multiaddr split into what we need: the IP/TCP part and the peer ids in it."""

    text: str
    ip: IP | None  # None for a /dns address
    port: int
    peer_id: str | None  # the final /p2p/ component
    relayed: bool  # contains /p2p-circuit


def parse(text: str) -> Parsed:
    """Parse a multiaddr string; ValueError if it is not one we can use."""
    try:
        ma = multiaddr.Multiaddr(text)
        protos = [p.name for p in ma.protocols()]
    except Exception as exc:  # the library raises several unrelated types
        raise ValueError(f"not a multiaddr: {exc}") from None
    if not protos or protos[0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
        raise ValueError("must start with /ip4, /ip6 or /dns")
    if len(protos) < 2 or protos[1] != "tcp":
        raise ValueError("only TCP addresses are dialled")
    ip = unmapped(ipaddress.ip_address(ma.value_for_protocol(protos[0]))) if protos[0] in ("ip4", "ip6") else None
    parts = str(ma).split("/")
    peer_id = parts[-1] if len(parts) >= 3 and parts[-2] == "p2p" else None
    return Parsed(str(ma), ip, int(ma.value_for_protocol("tcp")), peer_id, "p2p-circuit" in protos)


# --- what we advertise --------------------------------------------------------


# Interfaces that are up but rarely what another machine should dial: container
# bridges and veths, VM bridges, VPN tunnels. Their addresses go after the rest.
_VIRTUAL = ("docker", "br-", "veth", "virbr", "vnet", "cni", "flannel", "cali", "vmnet", "vboxnet",
            "tun", "tap", "wg", "tailscale", "zt", "lxc", "podman")


@dataclass(frozen=True)
class Interfaces:
    ips: tuple[IP, ...]  # best first: default-route interface, others, virtual ones
    virtual: frozenset[IP]  # on docker/VM bridges and VPN tunnels: advertised after all others


def interface_ips() -> list[IP]:
    return list(interfaces().ips)


def interfaces() -> Interfaces:
    """IPs of every interface that is up (psutil), best first: the interface of
    the default route, then the others, then virtual ones (docker0 is "up"
    with no container running). I/O: not for pure code."""
    import socket

    import psutil

    stats = psutil.net_if_stats()
    default = _default_route_interfaces()
    ranked: list[tuple[int, IP]] = []
    for name, entries in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        rank = 0 if name in default else 2 if name.startswith(_VIRTUAL) else 1
        for e in entries:
            if e.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ranked.append((rank, ipaddress.ip_address(e.address.split("%", 1)[0])))
            except ValueError:
                continue
    ranked.sort(key=lambda r: r[0])  # stable: the kernel's order within a rank
    return Interfaces(tuple(ip for _, ip in ranked), frozenset(ip for rank, ip in ranked if rank == 2))


def _default_route_interfaces() -> set[str]:
    """Interfaces with a default route (Linux ``/proc/net/route``); empty elsewhere."""
    out: set[str] = set()
    try:
        with open("/proc/net/route") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if len(parts) > 2 and parts[1] == "00000000":
                    out.add(parts[0])
    except OSError:
        pass
    return out


def _order(ip: IP) -> tuple[int, int]:
    return (int(scope(ip)), ip.version)


def advertise(
    listen: Sequence[str],
    ips: Iterable[IP],
    peer_id: str,
    *,
    observed: Sequence[str] = (),
    announce: Sequence[str] = (),
    virtual: Collection[IP] = (),
) -> list[str]:
    """The addresses we tell others, each ending in ``/p2p/<peer_id>``, best first.

    ``listen`` are the bound transport addresses (port resolved); ``ips``
    the host's interface addresses; ``observed`` addresses peers confirmed
    seeing us at (identify); ``announce`` the user's ``--announce`` list,
    which replaces everything else; ``virtual`` the IPs on container, VM and
    VPN interfaces, which go last whatever their scope (a VPS's docker0
    must not come before its public address). With no interface address
    known (psutil failed), a wildcard bind falls back to loopback.
    """
    suffix = f"/p2p/{peer_id}"
    if announce:
        return list(dict.fromkeys(a if a.endswith(suffix) else a + suffix for a in announce))[:MAX_ADVERTISED]
    ips = sorted(dict.fromkeys(unmapped(ip) for ip in ips), key=_order)  # stable: keeps the caller's preference
    found: list[tuple[IP, int]] = []
    for text in [*listen, *observed]:
        try:
            p = parse(text.split("/p2p/", 1)[0])
        except ValueError:
            continue
        if p.ip is None:
            continue
        if p.ip.is_unspecified:  # a wildcard bind: every interface of that family
            family = [ip for ip in ips if ip.version == p.ip.version]
            found.extend((ip, p.port) for ip in family or [ipaddress.ip_address("127.0.0.1" if p.ip.version == 4
                                                                                 else "::1")])
        else:
            found.append((p.ip, p.port))
    found = [(ip, port) for ip, port in dict.fromkeys(found) if scope(ip) not in (Scope.UNSPECIFIED, Scope.LINK_LOCAL)]
    reach = [f for f in found if scope(f[0]) <= Scope.PUBLIC]
    chosen = reach or found  # loopback only when there is nothing else
    chosen.sort(key=lambda f: (f[0] in virtual, *_order(f[0])))
    return [f"/ip{ip.version}/{ip}/tcp/{port}{suffix}" for ip, port in chosen][:MAX_ADVERTISED]


# --- what we accept from others -----------------------------------------------


@dataclass(frozen=True)
class Checked:
    kept: tuple[str, ...]
    dropped: int  # unparseable, wildcard, or not ending in the announcer's id
    trimmed: int  # valid but over the limit


def check_announced(addrs: Sequence[str], peer_id: str, *, limit: int = MAX_ADVERTISED) -> Checked:
    """Keep an announcement's addresses that are the announcer's own."""
    kept: list[str] = []
    dropped = 0
    for text in addrs:
        try:
            p = parse(text)
        except ValueError:
            dropped += 1
            continue
        if p.peer_id != peer_id or (p.ip is not None and p.ip.is_unspecified):
            dropped += 1
            continue
        if p.text not in kept:
            kept.append(p.text)
    return Checked(tuple(kept[:limit]), dropped, max(0, len(kept) - limit))


def dial_plan(addrs: Sequence[str], own: Sequence[str], ips: Iterable[IP], self_id: str | None = None) -> list[str]:
    """The order to dial a peer's checked addresses in: direct ones best first,
    relayed ones last. Never one of ``own`` (our advertised or listen
    addresses) nor a relay that is us; never multicast, broadcast or
    reserved; loopback and link-local only when we are on loopback alone
    ourselves (a test mesh on one machine). Whether a peer shares our host
    is not taken from what it announces: a stranger would claim our IP to
    make us dial our own loopback ports."""
    ips = list(ips)
    advertised = [p for p in _parsed(own) if not p.relayed and not (p.ip is not None and p.ip.is_unspecified)]
    local_only = bool(advertised) and all(p.ip is not None and scope(p.ip) == Scope.LOOPBACK for p in advertised)
    mine: set[tuple[IP | None, int]] = set()
    for p in _parsed(own):
        if p.relayed:  # our circuit address names the relay's IP and port, not ours
            continue
        if p.ip is not None and p.ip.is_unspecified:
            mine.update((ip, p.port) for ip in ips if ip.version == p.ip.version)
        mine.add((p.ip, p.port))

    def usable(p: Parsed) -> bool:
        """The IP/TCP part of an address may be dialled by us."""
        if p.ip is None:  # a DNS name: only "localhost" is known to be loopback without resolving it
            host = p.text.split("/", 3)[2].lower().rstrip(".")
            return local_only or not (host == "localhost" or host.endswith(".localhost"))
        s = scope(p.ip)
        if s == Scope.UNSPECIFIED or (p.ip, p.port) in mine:
            return False
        return local_only or s not in (Scope.LOOPBACK, Scope.LINK_LOCAL)

    direct: list[tuple[tuple[int, int], str]] = []
    relayed: list[str] = []
    for p in _parsed(addrs):
        if p.relayed:
            relay_part, _, _ = p.text.partition("/p2p-circuit")
            relay_id = relay_part.rsplit("/p2p/", 1)[-1]
            try:
                relay = parse(relay_part)
            except ValueError:
                continue
            if relay_id != self_id and usable(relay):  # the relay's own address gets the same checks
                relayed.append(p.text)
            continue
        if usable(p):
            direct.append((_order(p.ip) if p.ip is not None else (int(Scope.PUBLIC), 4), p.text))
    direct.sort(key=lambda d: d[0])
    return list(dict.fromkeys([t for _, t in direct] + relayed))


def _parsed(texts: Iterable[str]) -> list[Parsed]:
    out = []
    for text in texts:
        try:
            out.append(parse(text))
        except ValueError:
            continue
    return out
