"""Layered, validated, frozen configuration.

Four layers, lowest first: built-in defaults, a YAML file, environment
variables ``MESHOLLAMA_<SECTION>_<KEY>``, and overrides from command-line flags
(only the flags the user typed). Each value is checked where it enters, so an
error names the key and the layer it came from; rules between keys are checked
once on the merged result, which is a tree of frozen dataclasses.

The section dataclasses are the schema: each field carries its kind (the
validator) and a one-line doc in ``metadata``; environment names and the
parsing of every layer derive from them. ``Config()`` gives the defaults
without validation (handy in tests); start-up goes through :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import multiaddr
import yaml

from .errors import ConfigError
from .mesh import bootstrap_url

__all__ = [
    "ENV_PREFIX", "CONFIG_ENV", "OTHER_ENV", "Config", "NodeConfig", "P2PConfig", "GatewayConfig",
    "MeshConfig", "BackendConfig", "OllamaConfig", "EmbeddedConfig", "ModelsConfig", "TracingConfig", "load_config", "check_file", "config_to_dict",
]

ENV_PREFIX = "MESHOLLAMA_"
CONFIG_ENV = "MESHOLLAMA_CONFIG"  # the config file path, when --config is not given
# MESHOLLAMA_ variables that are not config keys: the file path, and the key the
# client commands (`meshollama peers/status`) send to a gateway.
# MESHOLLAMA_TEST_FAULTS=1 arms the fault suite's hook (SIGUSR2 fails the libp2p host); never set in use.
OTHER_ENV = frozenset({CONFIG_ENV, "MESHOLLAMA_API_KEY", "MESHOLLAMA_TEST_FAULTS"})


# --- kinds: how one value is checked, typed (YAML, flags) or as env text -----


def _got(value: Any) -> str:
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Kind:
    """``check`` returns the value, raises TypeError for "not the expected form"
    (answered with the generic message) or ValueError with a message of its own."""

    expected = "a value"

    def check(self, raw: Any) -> Any:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        """Environment text to the typed value ``check`` takes."""
        return text

    def value(self, key: str, raw: Any, *, from_text: bool = False) -> Any:
        try:
            return self.check(self.parse(raw) if from_text else raw)
        except TypeError:
            raise ConfigError(key, f"expected {self.expected}, got {_got(raw)}") from None
        except ValueError as e:
            raise ConfigError(key, str(e)) from None


class _Str(_Kind):
    def __init__(self, expected: str = "a non-empty string", test: Callable[[str], str] = str.strip,
                 empty: bool = False):
        self.expected, self.test, self.empty = expected, test, empty

    def check(self, raw: Any) -> str:
        if isinstance(raw, str) and not raw.strip() and self.empty:
            return ""
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError
        return self.test(raw.strip())


class _Choice(_Str):
    def __init__(self, *options: str):
        super().__init__("one of " + ", ".join(options), self._pick)
        self.options = options

    def _pick(self, text: str) -> str:
        if text.lower() not in self.options:
            raise TypeError
        return text.lower()


class _Num(_Kind):
    """An int or float in a range. Floats take ints; neither takes a bool (an int in Python)."""

    def __init__(self, typ: type, lo: float, hi: float | None = None, *, open_lo: bool = False):
        self.typ, self.lo, self.hi, self.open_lo = typ, lo, hi, open_lo
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
        self.expected = f"{'an integer' if typ is int else 'a number'} {bound}"

    def check(self, raw: Any) -> Any:
        types = (int,) if self.typ is int else (int, float)
        if isinstance(raw, bool) or not isinstance(raw, types) or not math.isfinite(raw):
            raise TypeError
        if raw < self.lo or (self.open_lo and raw == self.lo) or (self.hi is not None and raw > self.hi):
            raise TypeError
        return self.typ(raw)

    def parse(self, text: str) -> Any:
        try:
            return self.typ(text)
        except ValueError:
            raise TypeError from None


def _int(lo: int) -> _Num:
    return _Num(int, lo)


def _positive() -> _Num:
    return _Num(float, 0, open_lo=True)


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


class _Bool(_Kind):
    expected = "true or false"

    def check(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise TypeError
        return raw

    def parse(self, text: str) -> bool:
        if text.lower() not in _BOOL_WORDS:
            raise ValueError(f"expected one of 1/0/true/false/yes/no/on/off, got {_got(text)}")
        return _BOOL_WORDS[text.lower()]


class _Path(_Kind):
    def __init__(self, optional: bool = False):
        self.optional = optional
        self.expected = "a file system path" + (" or null" if optional else "")

    def check(self, raw: Any) -> Path | None:
        if raw is None and self.optional:
            return None
        raw = os.fspath(raw) if isinstance(raw, os.PathLike) else raw
        if not isinstance(raw, str) or not raw.strip():
            raise TypeError
        return Path(raw.strip()).expanduser()

    def parse(self, text: str) -> str | None:
        return None if text == "" and self.optional else text  # an empty variable: no file


class _List(_Kind):
    """A YAML list, or comma-separated text; items are checked and named ``key[i]``."""

    def __init__(self, item: _Kind, min_len: int = 0):
        self.item, self.min_len = item, min_len
        self.expected = f"a list (each {item.expected})" + (", at least one" if min_len else "")

    def value(self, key: str, raw: Any, *, from_text: bool = False) -> tuple[Any, ...]:
        items = [p.strip() for p in raw.split(",") if p.strip()] if from_text else raw
        if not isinstance(items, (list, tuple)) or len(items) < self.min_len:
            raise ConfigError(key, f"expected {self.expected}, got {_got(raw)}")
        return tuple(self.item.value(f"{key}[{i}]", v) for i, v in enumerate(items))


# --- tests for particular strings (TypeError: not the expected form) ----------


def _multiaddr(text: str) -> list[str]:
    """Protocol names of a multiaddr, or ValueError with the library's reason."""
    try:
        return [p.name for p in multiaddr.Multiaddr(text).protocols()]
    except (multiaddr.exceptions.Error, ValueError, TypeError) as e:
        reason = re.sub(r"^Invalid MultiAddr '.*?': | \(string: .*\)$", "", str(e))
        raise ValueError(f"not a valid multiaddr {text!r}: {reason}") from None


def _listen_addr(text: str) -> str:
    if _multiaddr(text) not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise TypeError
    return text


def _bootstrap_addr(text: str) -> str:
    if bootstrap_url.is_url(text):  # a node's API: its /healthz says whom to dial
        return bootstrap_url.check_url(text)
    names = _multiaddr(text)
    if len(names) < 2 or names[-1] != "p2p" or names.count("p2p") > 1:
        raise TypeError
    return text


def _host_port(text: str) -> str:
    m = re.fullmatch(r"(?:\[([^\]]+)\]|[^:\[\]\s]+):(\d{1,5})", text)
    if m is None or int(m[2]) > 65535:
        raise TypeError
    if m[1] is not None:
        try:
            ipaddress.IPv6Address(m[1])
        except ValueError:
            raise TypeError from None
    return text


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TypeError
    return text.rstrip("/")  # callers join paths onto it


def _api_key(text: str) -> str:
    if any(c.isspace() for c in text):
        raise TypeError
    return text


def _authority(text: str) -> str:
    # The format is checked here without importing the crypto (trust.keys has the codec).
    m = re.fullmatch(r"ed25519:([A-Za-z0-9_-]{43})", text)
    if m is None:
        raise TypeError
    return text


def _host_name(text: str) -> str:
    if text != "*" and not re.fullmatch(r"(\*\.)?[A-Za-z0-9.\-\[\]:]+", text):
        raise TypeError
    return text.lower()


def _origin(text: str) -> str:
    if text != "*" and (urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).netloc):
        raise TypeError
    return text.rstrip("/")


def _announce_addr(text: str) -> str:
    names = _multiaddr(text)
    if len(names) < 2 or names[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or names[1] != "tcp":
        raise TypeError
    if names[2:]:  # our /p2p/ id is added for us; relay addresses come from reservations
        raise TypeError
    if names[0] in ("ip4", "ip6") and ipaddress.ip_address(multiaddr.Multiaddr(text).value_for_protocol(names[0])).is_unspecified:
        raise ValueError(f"{text!r} is a wildcard: announce an address others can dial")
    return text


_LISTEN = _List(_Str("a multiaddr /ip4/<address>/tcp/<port> or /ip6/<address>/tcp/<port>", _listen_addr), 1)
_ANNOUNCE = _List(_Str("a multiaddr /ip4|ip6|dns4|dns6/<host>/tcp/<port> (no /p2p/: ours is added)", _announce_addr))
_BOOTSTRAP = _List(_Str("a multiaddr ending in /p2p/<peer id>, or a node's API URL http(s)://HOST:PORT",
                        _bootstrap_addr))
_API_KEY = _Str("an API key without whitespace", _api_key)


# --- the schema ---------------------------------------------------------------


def _opt(kind: _Kind, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"kind": kind, "doc": doc})


@dataclass(frozen=True)
class NodeConfig:
    # In the home directory, so a plain `meshollama` needs no setup and keeps its identity.
    data_dir: Path = field(default_factory=lambda: Path("~/.meshollama").expanduser(),
                           metadata={"kind": _Path(), "doc": "node key and state"})
    # info shows joins, leaves and failures without per-request noise.
    log_level: str = _opt(_Choice("debug", "info", "warning", "error"), "info", "log verbosity")
    # text is for people at a terminal; json is opt-in for log shippers.
    log_format: str = _opt(_Choice("text", "json"), "text", "log line format")


@dataclass(frozen=True)
class P2PConfig:
    # 4001 is the customary libp2p port; every interface, IPv4 and IPv6, so peers on the LAN
    # can dial in (an IPv6 listen address is skipped on a host without IPv6).
    listen: tuple[str, ...] = _opt(_LISTEN, ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"), "libp2p listen multiaddrs")
    # Empty: advertise every up interface (LAN first) plus addresses peers confirm seeing us at.
    announce: tuple[str, ...] = _opt(_ANNOUNCE, (), "addresses to advertise instead (port forward, public IP)")
    # Off: relaying costs the relay bandwidth; only a reachable node should offer it.
    relay_service: bool = _opt(_Bool(), False, "forward connections for nodes behind NAT (Circuit Relay v2)")
    # auto: a node that a peer sees at a foreign IP (NAT) reserves on relays it knows.
    relay_client: str = _opt(_Choice("auto", "on", "off"), "auto", "reserve a slot on relays: auto (behind NAT), on, off")
    # A direct connection is faster and outlives the relay; the relay stays the fallback.
    hole_punching: bool = _opt(_Bool(), True, "upgrade relayed connections to direct ones (DCUtR)")
    # A relay's limits: enough for a home mesh, bounded against a flood.
    relay_max_reservations: int = _opt(_int(1), 128, "nodes a relay holds slots for")
    relay_max_circuits: int = _opt(_int(1), 16, "relayed connections to one node at once")
    relay_circuit_seconds: int = _opt(_int(1), 3600, "longest life of one relayed connection")
    # py-libp2p counts this per reservation, renewals included: generous, or the node goes dark.
    relay_circuit_bytes: int = _opt(_int(1024), 1 << 30, "bytes relayed for one node per reservation")
    # There is no public meshollama network: each mesh names its own peers.
    bootstrap: tuple[str, ...] = _opt(_BOOTSTRAP, (), "peers to dial at start and keep redialling")
    # On a LAN, mDNS finds peers with zero configuration.
    mdns: bool = _opt(_Bool(), True, "discover peers on the local network")
    # The DHT finds peers beyond the LAN through the ones we already know.
    dht: bool = _opt(_Bool(), True, "discover peers through the Kademlia DHT")
    # An open mesh by default; a private network is an explicit choice.
    psk_file: Path | None = _opt(_Path(optional=True), None, "pre-shared key file: private network")
    # A busy node announces its load at most this often (2 s keeps load figures fresh for
    # routing); an idle one says nothing new (mesh.cadence).
    heartbeat_interval: float = _opt(_Num(float, 0.05, 3600), 2.0, "shortest gap between load announcements")
    # Every announcement costs every peer ~10 ms of CPU: an idle node refreshes rarely, so an
    # idle mesh's cost per node does not grow with its size (docs/benchmarks.md). Peers expire
    # a node after miss_limit refreshes; a dead one closes its connections long before.
    refresh_interval: float = _opt(_Num(float, 0.05, 600), 30.0, "longest silence between announcements")
    # Every node hears every refresh: past refresh_interval / refresh_per_peer peers the refresh
    # grows with the mesh, so each node hears ~1 refresh per this many seconds whatever N.
    refresh_per_peer: float = _opt(_Num(float, 0.0, 600), 10.0, "seconds of refresh interval per peer in a larger mesh")
    # Past this many peers every node would hear every busy node's load changes: they are not
    # announced, and a gateway asks 3 holders for their load when it routes (mesh.load_client).
    full_view_up_to: int = _opt(_int(0), 32, "peers up to which load changes are announced (above: asked for)")
    # A load change too small to change routing (a quarter of the slots) is still said this late.
    load_max_silence: float = _opt(_Num(float, 0.05, 600), 10.0, "seconds a small load change waits at most")
    # Three missed refreshes forgive one lost message without routing long to a dead peer.
    miss_limit: int = _opt(_int(2), 3, "missed refreshes before a peer is dropped")
    # Pings every second notice a dead connection well before heartbeat expiry.
    liveness_interval: float = _opt(_positive(), 1.0, "seconds between liveness pings to busy peers (idle ones: x5, up to 16 peers)")
    # Two intervals: one slow pong is not a failure.
    liveness_timeout: float = _opt(_positive(), 2.0, "seconds to wait for a pong")
    # Pinging idle peers costs a node per peer; past a small mesh connection events and
    # heartbeat expiry find the gone ones (200 peers: 41.6 pings/s down to 2).
    liveness_ping_all_up_to: int = _opt(_int(0), 16, "peers up to which idle ones are pinged too (above: only peers used lately)")
    # Small meshes: 3 neighbours reach everyone in a few hops with little duplication.
    gossip_degree: int = _opt(_int(1), 3, "gossipsub mesh degree D")
    # One below D before grafting, so churn does not thrash the mesh.
    gossip_degree_low: int = _opt(_int(1), 2, "gossipsub D_low")
    # One above D before pruning, for the same reason.
    gossip_degree_high: int = _opt(_int(1), 4, "gossipsub D_high")
    # Generous for a slow link, short enough that a stuck peer is given up on.
    stream_timeout: float = _opt(_positive(), 10.0, "max seconds for one stream open/negotiate/write")
    # Bounds the tasks and memory a flood of streams can take; ample for one machine.
    max_inbound_streams: int = _opt(_int(1), 256, "requests from peers served at once, all peers")
    # One peer may take at most a quarter of the inbound budget.
    max_inbound_per_peer: int = _opt(_int(1), 64, "requests from one peer served at once")
    # A dead bootstrap peer costs little, a restarted one is found within half a minute.
    bootstrap_retry_max: float = _opt(_positive(), 30.0, "cap on seconds between bootstrap redials")
    # The gateway's own limit: a request it accepted must fit through a peer too.
    max_request_bytes: int = _opt(_int(1), 32 * 1024 * 1024, "largest request body a peer may send us")
    # Bounds memory against many large bodies at once (128 x 32 MiB would be 4 GiB): past it, busy.
    max_buffered_bytes: int = _opt(_int(1024), 256 * 1024 * 1024,
                                   "request bytes buffered from peers at once, all peers together")
    # One deadline for a request's head and body: a trickled body cannot hold a slot for ever.
    request_timeout: float = _opt(_positive(), 60.0, "seconds a peer has to send one whole request")
    # A forged flood of announcements cannot grow the table (and every route decision) without bound.
    max_peers: int = _opt(_int(2), 4096, "peers kept in the peer table")


@dataclass(frozen=True)
class GatewayConfig:
    # Ollama's port, so clients work unchanged; loopback, so nothing is exposed by accident.
    listen: str = _opt(_Str("HOST:PORT (port 0..65535, IPv6 as [::1]:PORT)", _host_port),
                       "127.0.0.1:11434", "HTTP API address")
    # No keys: a loopback gateway needs no auth.
    api_keys: tuple[str, ...] = _opt(_List(_API_KEY), (), "accepted bearer tokens")
    # Keys can live in a file, out of the config and the process list.
    api_key_file: Path | None = _opt(_Path(optional=True), None, "file of API keys, one per line")
    # 32 MiB fits a long context or a few images but bounds memory per request.
    max_body_bytes: int = _opt(_int(1), 32 * 1024 * 1024, "largest request body accepted")
    # Send work where it will wait least.
    routing: str = _opt(_Choice("least_loaded", "round_robin", "random", "local_first"),
                        "least_loaded", "how a peer is chosen")
    # Two more tries hide a peer that just died without multiplying load on a failing mesh.
    retries: int = _opt(_int(0), 2, "extra peers tried before the first response byte")
    # Skips a failing peer for a few heartbeats, then gives it another chance.
    sideline_seconds: float = _opt(_Num(float, 0), 10.0, "seconds a failed peer is tried last")
    # Matches p2p.stream_timeout: a slower connect is better retried elsewhere.
    connect_timeout: float = _opt(_positive(), 10.0, "seconds to reach an upstream")
    # A cold model load on a slow disk takes minutes; past this the next peer is tried.
    first_byte_timeout: float = _opt(_positive(), 300.0, "seconds an upstream has to send its first byte")
    # Streamed tokens come many times a second; a minute of silence is a wedged peer.
    stall_timeout: float = _opt(_positive(), 60.0, "longest silence between chunks of a streamed answer")
    # A stream broken mid-way continues on another holder of the same model.
    resume: bool = _opt(_Bool(), True, "continue a broken stream on another peer")
    # Busy everywhere: wait in line rather than fail, but not without bound.
    queue_size: int = _opt(_int(0), 64, "requests per model waiting for a free slot (0: none)")
    queue_timeout: float = _opt(_positive(), 120.0, "seconds a request waits in the queue before a 503")
    # Rolling restarts: in-flight work finishes here or moves elsewhere.
    drain_timeout: float = _opt(_positive(), 120.0, "seconds in-flight requests get to finish on drain")
    # Browsers are refused unless their origins are listed.
    cors_origins: tuple[str, ...] = _opt(_List(_Str("'*' or an origin like https://example.com", _origin)),
                                         (), "allowed CORS origins")
    # Past 256 in flight the mesh is saturated; a quick 503 beats an unbounded queue.
    max_concurrent: int = _opt(_int(1), 256, "concurrent routed requests before 503")
    # Empty: on a loopback bind only localhost names (Ollama's rule against DNS rebinding);
    # any name on other binds. '*' turns the check off.
    allowed_hosts: tuple[str, ...] = _opt(_List(_Str("a host name, *.example.com or '*'", _host_name)), (),
                                          "Host header values accepted besides localhost names")
    # Hypercorn's own TLS: both or neither.
    tls_cert: Path | None = _opt(_Path(optional=True), None, "TLS certificate chain (PEM)")
    tls_key: Path | None = _opt(_Path(optional=True), None, "TLS private key (PEM)")
    # Mutual TLS: clients must present a certificate signed by this CA.
    tls_client_ca: Path | None = _opt(_Path(optional=True), None, "CA bundle that client certificates must chain to")
    # JWTs for users who already run an identity provider: one key source or none.
    jwt_secret_file: Path | None = _opt(_Path(optional=True), None, "HS256 secret for bearer JWTs")
    jwt_public_key_file: Path | None = _opt(_Path(optional=True), None, "RS256/EdDSA public key (PEM) for bearer JWTs")
    # Most providers can put a custom claim in the token; "role" is the plain choice.
    jwt_role_claim: str = _opt(_Str(), "role", "JWT claim holding admin|user|readonly")
    jwt_audience: str = _opt(_Str(empty=True), "", "required JWT aud (empty: not checked)")
    jwt_issuer: str = _opt(_Str(empty=True), "", "required JWT iss (empty: not checked)")


@dataclass(frozen=True)
class BackendConfig:
    # Ollama if it answers, else the embedded model: a fresh install serves something.
    kind: str = _opt(_Choice("auto", "ollama", "embedded", "none"), "auto", "what serves local models")


@dataclass(frozen=True)
class OllamaConfig:
    # The gateway takes 11434, so Ollama moves next door.
    url: str = _opt(_Str("an http:// or https:// URL", _http_url), "http://127.0.0.1:11435",
                    "Ollama base URL")
    # Ollama's own default OLLAMA_NUM_PARALLEL; announced as capacity per model.
    num_parallel: int = _opt(_int(1), 1, "concurrent requests Ollama runs per model")
    # Never start processes the user did not ask for.
    spawn: bool = _opt(_Bool(), False, "start and supervise `ollama serve`")
    # Found on PATH like any other command.
    binary: str = _opt(_Str(), "ollama", "ollama executable used by spawn")
    # Model lists change rarely; 5 s notices a pull without polling hard.
    refresh_interval: float = _opt(_positive(), 5.0, "seconds between model/load polls")
    # A local Ollama answers in milliseconds; a second of silence means it is not there.
    probe_timeout: float = _opt(_positive(), 1.0, "seconds to wait when probing Ollama")
    # None: $OLLAMA_MODELS, else ~/.ollama/models (or Linux's service install), when Ollama is local.
    models_dir: Path | None = _opt(_Path(optional=True), None,
                                   "Ollama's models directory, where pulls from peers are stored")


@dataclass(frozen=True)
class EmbeddedConfig:
    # None: the embedded backend uses <data_dir>/models.
    model_dir: Path | None = _opt(_Path(optional=True), None, "directory of GGUF files")
    # A fresh node serves something small out of the box.
    default_model: bool = _opt(_Bool(), True, "serve SmolLM2-135M as smollm2:135m")
    # One at a time: CPU inference gains little from parallel requests.
    parallel: int = _opt(_int(1), 1, "requests generated at once")
    # A short queue; past it the node answers busy and the gateway tries elsewhere.
    max_queue: int = _opt(_int(0), 8, "requests waiting before busy")
    # Plenty for chat with a small model, cheap in memory.
    n_ctx: int = _opt(_int(16), 8192, "context window in tokens (at most the model's own)")
    # 0 lets llama.cpp choose from the CPU count.
    n_threads: int = _opt(_int(0), 0, "CPU threads, 0 = auto")
    # The same model answers /api/embed: embeddings without another download.
    embedding: bool = _opt(_Bool(), True, "also serve embeddings from the model")


def _replica(text: str) -> str:
    name, sep, copies = text.rpartition("=")
    if not sep or not copies.strip().isdigit() or not 0 <= int(copies) <= 64:
        raise TypeError
    from . import names
    try:
        names.parse(name.strip())
    except Exception:
        raise TypeError from None
    return f"{name.strip()}={int(copies)}"


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:=-]{1,64}", text):
        raise TypeError
    return text


@dataclass(frozen=True)
class ModelsConfig:
    # Peers first: a model one node has is never downloaded from the internet again.
    pull_from_peers: bool = _opt(_Bool(), True, "pull models from peers before the backend's registry")
    # Serving is what makes the above work for others.
    serve: bool = _opt(_Bool(), True, "serve the blobs of our models to admitted peers")
    # 0: as fast as the link goes.
    serve_rate: float = _opt(_Num(float, 0), 0.0, "bytes per second all blob uploads share (0 = no cap)")
    # Reads from disk and Noise encryption cost CPU: a few at once saturate a link.
    serve_streams: int = _opt(_int(1), 16, "blob requests served at once, all peers together")
    serve_per_peer: int = _opt(_int(1), 4, "blob requests served at once to one peer")
    # Copy counts set here weigh as an old `meshollama replicate` (stamp 0): any later one wins.
    replicas: tuple[str, ...] = _opt(_List(_Str("MODEL=COPIES (0 to 64)", _replica)), (),
                                     "copy counts, e.g. [llama3.2:1b=3]")
    # A node volunteers only with room to spare.
    accept_replicas: bool = _opt(_Bool(), True, "volunteer to hold copies the mesh asks for")
    min_free_bytes: int = _opt(_int(0), 2 * 1024**3, "free bytes a replica must leave on the disk")
    # A reboot is not a departure: wait before making another copy.
    replica_grace: float = _opt(_positive(), 120.0, "seconds a holder may be gone before another node copies")
    labels: tuple[str, ...] = _opt(_List(_Str("a label of letters, digits and _.:=-", _label)), (),
                                   "labels of this node (replicate --label selects nodes by them)")


@dataclass(frozen=True)
class MeshConfig:
    # Empty: an open mesh, as before (a warning when listening beyond loopback).
    authority: str = _opt(_Str("ed25519:<43 base64url chars> (meshollama mesh init prints it) or empty", _authority, empty=True), "",
                          "mesh authority public key: only peers it admits join")
    # Generous for a loaded 2-core box; a peer that has not proved itself by then is cut off.
    admission_timeout: float = _opt(_positive(), 10.0, "seconds a new connection has to present a certificate")


_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")  # visible ASCII, inner spaces


def _otlp_header(text: str) -> str:
    """``NAME=VALUE`` as an HTTP header. Errors name the header, never its value (a collector key)."""
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not sep:
        raise ValueError("expected NAME=VALUE (an HTTP header), found no '=' (value not shown); in "
                         "MESHOLLAMA_TRACING_HEADERS entries are split at commas, so a value with a comma "
                         "must be set in the config file")
    if not _HTTP_TOKEN.fullmatch(name):
        raise ValueError("expected NAME=VALUE with NAME an HTTP header name (letters, digits and "
                         "!#$%&'*+-.^_`|~), value not shown")
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError(f"the value of header {name.lower()!r} must be printable ASCII: no other "
                         "characters, tabs or line breaks (value not shown)")
    return f"{name.lower()}={value}"


class _OtlpHeader(_Str):
    """One ``NAME=VALUE`` header; unlike :class:`_Str`, a refusal never echoes what was given."""

    def __init__(self) -> None:
        super().__init__("NAME=VALUE (an HTTP header)", _otlp_header)

    def check(self, raw: Any) -> str:
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"expected {self.expected} as a string, got {type(raw).__name__} (value not shown)")
        return super().check(raw)


class _OtlpHeaders(_List):
    """The ``tracing.headers`` list; a value that is not a list is not echoed either."""

    def value(self, key: str, raw: Any, *, from_text: bool = False) -> tuple[Any, ...]:
        if not from_text and not isinstance(raw, (list, tuple)):
            raise ConfigError(key, f"expected {self.expected}, got {type(raw).__name__} (value not shown)")
        return super().value(key, raw, from_text=from_text)


def _otlp_endpoint(text: str) -> str:
    """A collector's base URL: no credentials in it (they would be logged), no query or fragment."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise ValueError("expected an http:// or https:// URL (not a valid URL; value not shown)") from None
    if "@" in parts.netloc:
        raise ValueError("a user name or password in the URL is not allowed (it would be logged); send "
                         "credentials with tracing.headers, e.g. [authorization=Basic ...]")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TypeError
    if re.search(r"[\x00-\x20\x7f]", text):
        raise ValueError("expected an http:// or https:// URL without spaces or control characters")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("expected a URL without a query (?...) or fragment (#...)")
    return text.rstrip("/")  # paths are joined onto it


@dataclass(frozen=True)
class TracingConfig:
    # Off unless asked: a collector is something the operator runs. A client's traceparent is passed on anyway.
    otlp_endpoint: str = _opt(_Str("an http:// or https:// URL, or empty", _otlp_endpoint, empty=True), "",
                              "OTLP/HTTP collector URL; spans are POSTed as JSON to <url>/v1/traces (empty: off)")
    service_name: str = _opt(_Str(), "meshollama", "service.name on this node's spans")
    # Every trace by default: a mesh's request rate is low next to a collector's capacity.
    sample_ratio: float = _opt(_Num(float, 0, 1), 1.0, "fraction of new traces recorded (a caller's flag wins)")
    # A hosted collector wants a key: `authorization=Bearer ...`, `x-honeycomb-team=...`.
    headers: tuple[str, ...] = _opt(_OtlpHeaders(_OtlpHeader()), (),
                                    "HTTP headers sent with every export")


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)


# Read off the dataclasses: section -> class, dotted key -> kind, env name -> dotted key.
_SECTIONS: dict[str, Any] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_KINDS: dict[str, _Kind] = {
    f"{s}.{f.name}": f.metadata["kind"] for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
}
_ENV_KEYS: dict[str, str] = {ENV_PREFIX + k.replace(".", "_").upper(): k for k in _KINDS}


# --- the layers ---------------------------------------------------------------


def _unknown(key: str) -> ConfigError:
    section = key.partition(".")[0]
    if section not in _SECTIONS:
        return ConfigError(section, f"unknown section {section!r} (known: {', '.join(_SECTIONS)})")
    known = ", ".join(f.name for f in dataclasses.fields(_SECTIONS[section]))
    return ConfigError(key, f"unknown key (known: {known})")


def _checked(key: str, raw: Any, where: str, *, from_text: bool = False) -> Any:
    """One value through its kind; the error also says which layer it came from."""
    if key not in _KINDS:
        raise _unknown(key)
    try:
        return _KINDS[key].value(key, raw.strip() if from_text else raw, from_text=from_text)
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message} ({where})") from None


class _Loader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, where YAML would silently keep the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(key, f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(_read_text(path, "file"), Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("file", f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        got = type(data).__name__
        raise ConfigError("file", f"{path}: expected a mapping of sections at the top, got {got}")
    out: dict[str, Any] = {}
    for section, keys in data.items():
        if str(section) not in _SECTIONS:
            raise _unknown(str(section))
        if keys is None:  # a section whose keys are all commented out
            continue
        if not isinstance(keys, dict):
            raise ConfigError(str(section), f"expected a mapping of keys, got {_got(keys)} (in {path})")
        for name, raw in keys.items():
            out[f"{section}.{name}"] = _checked(f"{section}.{name}", raw, f"in {path}")
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in OTHER_ENV:
            continue
        if var not in _ENV_KEYS:
            close = difflib.get_close_matches(var, [*_ENV_KEYS, *sorted(OTHER_ENV)], n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(var, f"unknown environment variable{hint} (see docs/configuration.md)")
        out[_ENV_KEYS[var]] = _checked(_ENV_KEYS[var], env[var], f"from {var}", from_text=True)
    return out


def _from_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    # A flag parsed without a type= arrives as a string: read it as env text.
    return {key: _checked(key, raw, "from the command line", from_text=isinstance(raw, str))
            for key, raw in overrides.items()}


# --- assembling ---------------------------------------------------------------


def _read_key_file(path: Path) -> tuple[str, ...]:
    key, keys = "gateway.api_key_file", []
    for n, line in enumerate(_read_text(path, key).splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            if any(c.isspace() for c in line):
                raise ConfigError(key, f"{path} line {n}: an API key must not contain whitespace")
            keys.append(line)
    if not keys:  # almost surely a mistake, and serving without auth is the wrong way to fail
        raise ConfigError(key, f"{path}: no keys in file (one key per line, '#' starts a comment)")
    return tuple(keys)


def _build(values: Mapping[str, Any]) -> Config:
    by_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        by_section[section][name] = value
    cfg = Config(**{s: cls(**by_section[s]) for s, cls in _SECTIONS.items()})

    p = cfg.p2p
    if not p.gossip_degree_low <= p.gossip_degree <= p.gossip_degree_high:
        raise ConfigError("p2p.gossip_degree", (
            "expected gossip_degree_low <= gossip_degree <= gossip_degree_high, "
            f"got {p.gossip_degree_low} <= {p.gossip_degree} <= {p.gossip_degree_high}"))
    if p.max_request_bytes > p.max_buffered_bytes:
        raise ConfigError("p2p.max_request_bytes", (
            f"expected at most p2p.max_buffered_bytes ({p.max_buffered_bytes}), got {p.max_request_bytes}"))
    if p.max_inbound_per_peer > p.max_inbound_streams:
        raise ConfigError("p2p.max_inbound_per_peer", (
            f"expected at most p2p.max_inbound_streams ({p.max_inbound_streams}), "
            f"got {p.max_inbound_per_peer}"))
    g = cfg.gateway
    if (g.tls_cert is None) != (g.tls_key is None):
        raise ConfigError("gateway.tls_cert", "expected both gateway.tls_cert and gateway.tls_key, or neither")
    if g.tls_client_ca is not None and g.tls_cert is None:
        raise ConfigError("gateway.tls_client_ca", "client certificates need TLS: set gateway.tls_cert and tls_key")
    if g.jwt_secret_file is not None and g.jwt_public_key_file is not None:
        raise ConfigError("gateway.jwt_secret_file", "expected one of jwt_secret_file and jwt_public_key_file")
    if g.api_key_file is not None:
        merged = tuple(dict.fromkeys(g.api_keys + _read_key_file(g.api_key_file)))
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(g, api_keys=merged))
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults < YAML file < ``MESHOLLAMA_*`` environment < overrides, validated once.

    ``env`` defaults to ``os.environ``; its ``MESHOLLAMA_CONFIG`` names the file
    when ``path`` is None. ``overrides`` maps dotted keys (``"p2p.bootstrap"``)
    to values of flags the user typed; typed values are checked like YAML,
    strings like environment text. Raises :class:`ConfigError` naming the key.
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(CONFIG_ENV) or None
    values = _from_file(Path(path).expanduser()) if path is not None else {}
    values.update(_from_env(env))
    values.update(_from_overrides(overrides or {}))
    return _build(values)


def check_file(path: str | os.PathLike[str]) -> Config:
    """Validate one YAML file alone, without environment or flags (``meshollama config check``)."""
    return load_config(path, env={})


def config_to_dict(cfg: Config, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """Nested plain dict (paths as str, tuples as lists, None kept) for printing or YAML.

    API keys read ``"***"`` unless ``redact=False``: this output lands in logs and bug reports.
    """
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if redact and "api_keys" in values:
            values["api_keys"] = ["***"] * len(values["api_keys"])
        if redact and section == "tracing":  # collector credentials
            values["headers"] = [h.split("=", 1)[0] + "=***" for h in values["headers"]]
            # Refused by the loader; a TracingConfig built in code may still carry one.
            values["otlp_endpoint"] = re.sub(r"(?<=//)[^/?#]*@", "***@", values["otlp_endpoint"])
        out[section] = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                        for k, v in values.items()}
    return out
