"""The config schema: one frozen dataclass per section, each field with its kind
and a one-line doc in ``metadata`` (``meshollama.config`` loads and layers them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config_kinds import (
    _ANNOUNCE,
    _API_KEY,
    _BOOTSTRAP,
    _LISTEN,
    _authority,
    _Bool,
    _Choice,
    _host_name,
    _host_port,
    _http_url,
    _int,
    _Kind,
    _List,
    _Num,
    _origin,
    _Path,
    _positive,
    _Str,
)
from .errors import ConfigError


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
