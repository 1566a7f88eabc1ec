"""Bootstrap from a node's API URL: ``--bootstrap http://node1:11434``.

A multiaddr bootstrap needs the peer id, which exists only once the node
has run; containers, StatefulSet pods and freshly provisioned machines know
a *name* in advance and nothing else. So a bootstrap entry may be the API
URL of another node: before each dial we ``GET <url>/healthz`` (no
credential needed), read its ``peer_id`` and ``p2p_addrs``, and dial those.

What the answer claims is checked, not trusted: the id must be a valid
peer id and every address must end in that id, and the Noise handshake
then proves the dialled node holds that id's key. The URL's own host, as
this machine resolves it, is dialled first with each announced TCP port,
because a node inside a container or a pod announces the addresses it sees
(which may not be the ones the name leads to). Over plain HTTP a machine on
the path could substitute its own node: in a closed mesh admission still
refuses it; in an open mesh use ``https://`` or the multiaddr form.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import ssl

import httpx
import trio

from ..errors import P2PError
from ..p2p import addrs as addrs_mod

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 1024
MAX_ADDRS = 32
TIMEOUT = 5.0


def is_url(entry: str) -> bool:
    return entry.startswith(("http://", "https://"))


def check_url(text: str) -> str:
    """``text`` if it is a usable bootstrap URL, else ValueError saying why."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http://HOST:PORT or https://HOST:PORT")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no credentials in a bootstrap URL: /healthz needs none")
    if "%" in parts.hostname:
        raise ValueError("no zoned IPv6 address (fe80::...%eth0): it cannot be dialled; use a routable address")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a bootstrap URL is a node's API root: no path, query or fragment")
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    return text.rstrip("/")


async def resolve(url: str, *, get: Callable | None = None, getaddrinfo: Callable = trio.socket.getaddrinfo,
                  timeout: float = TIMEOUT) -> tuple[str, list[str]]:
    """(peer id, multiaddrs to dial) of the node serving ``url``; P2PError if none.

    ``get(url) -> (status, bytes)`` is injectable for tests; the default
    uses httpx with a size cap and ``timeout``.
    """
    fetch = get or _http_get
    try:
        with trio.fail_after(timeout):
            status, body = await fetch(url.rstrip("/") + "/healthz")
            if status != 200:
                raise P2PError(f"bootstrap {url}: /healthz answered {status}")
            peer_id, announced = parse_health(body)
            own = [a for a in await _own_view(url, announced, peer_id, getaddrinfo) if a not in announced]
    except (httpx.HTTPError, OSError, trio.TooSlowError) as exc:
        raise P2PError(f"bootstrap {url}: {type(exc).__name__}: {exc}") from None
    # Our view of the URL's host first, but never at the expense of every announced address.
    return peer_id, own[:MAX_ADDRS // 2] + announced[:MAX_ADDRS - min(len(own), MAX_ADDRS // 2)]


def parse_health(body: bytes) -> tuple[str, list[str]]:
    """The peer id and the dialable addresses a /healthz answer claims (P2PError if malformed)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # "[[[[..." within the size cap is a RecursionError
        raise P2PError("bootstrap: /healthz did not answer JSON (is this a meshollama node?)") from None
    peer_id = doc.get("peer_id") if isinstance(doc, dict) else None
    raw = doc.get("p2p_addrs") if isinstance(doc, dict) else None
    if not addrs_mod.is_peer_id(peer_id) or not isinstance(raw, list):
        raise P2PError("bootstrap: /healthz has no valid peer_id and p2p_addrs (is this a meshollama node?)")
    texts = [a for a in raw[:MAX_ADDRS] if isinstance(a, str) and len(a) <= 512]
    texts = [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in texts]
    found = list(addrs_mod.check_announced(texts, peer_id, limit=MAX_ADDRS).kept)
    if not found:
        raise P2PError(f"bootstrap: node {peer_id} announces no TCP address")
    return peer_id, found


async def _own_view(url: str, announced: list[str], peer_id: str, getaddrinfo: Callable) -> list[str]:
    """The URL's host (as we resolve it) with each TCP port the node announces."""
    host = urlsplit(url).hostname or ""
    try:
        ip = ipaddress.ip_address(host)
        ips = [ip]
    except ValueError:
        try:
            infos = await getaddrinfo(host, None, type=trio.socket.SOCK_STREAM)
        except OSError:
            return []
        ips = []
        for info in infos:
            candidate = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if candidate not in ips:
                ips.append(candidate)
    ports: list[int] = []
    for addr in announced:
        parsed = addrs_mod.parse(addr)
        if not parsed.relayed and parsed.port not in ports:
            ports.append(parsed.port)
    return [f"/{'ip4' if ip.version == 4 else 'ip6'}/{ip}/tcp/{port}/p2p/{peer_id}" for ip in ips for port in ports]


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Made once: loading the system's CA store reads files, not to be done on every attempt."""
    return ssl.create_default_context()


async def _http_get(url: str) -> tuple[int, bytes]:
    # The system's CAs (and SSL_CERT_FILE / SSL_CERT_DIR) verify https://, so a LAN gateway
    # with a private CA works once that CA is installed; no proxies from the environment.
    async with httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False,
                                 verify=_tls_context()) as client:
        # Raw bytes only: a compressed answer could expand to gigabytes before any cap on decoded bytes.
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        async with client.stream("GET", url, headers=headers) as resp:
            if resp.headers.get("content-encoding", "identity").lower() != "identity":
                raise P2PError(f"bootstrap {url}: compressed answer refused")
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    raise P2PError(f"bootstrap {url}: answer over {MAX_ANSWER_BYTES} bytes")
            return resp.status_code, bytes(body)

