"""The ``meshollama`` command line.

Flags default to "not given" (``argparse.SUPPRESS``) so only what the user
typed overrides the config file and environment, as in hypercorn's CLI.
Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError, IdentityError, MeshollamaError, PortInUseError

# flag dest -> dotted config key
FLAG_KEYS = {
    "data_dir": "node.data_dir",
    "log_level": "node.log_level",
    "log_format": "node.log_format",
    "p2p_listen": "p2p.listen",
    "announce": "p2p.announce",
    "relay_client": "p2p.relay_client",
    "bootstrap": "p2p.bootstrap",
    "psk_file": "p2p.psk_file",
    "authority": "mesh.authority",
    "heartbeat_interval": "p2p.heartbeat_interval",
    "refresh_interval": "p2p.refresh_interval",
    "api_listen": "gateway.listen",
    "api_key_file": "gateway.api_key_file",
    "routing": "gateway.routing",
    "backend": "backend.kind",
    "ollama_url": "ollama.url",
    "model_dir": "embedded.model_dir",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshollama", description="Pool machines running LLMs into one Ollama endpoint.")
    p.add_argument("--version", action="version", version=f"meshollama {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    S = argparse.SUPPRESS

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", default=S, help="YAML config file (also MESHOLLAMA_CONFIG)")
        sp.add_argument("--data-dir", default=S, help="identity and state directory (default ~/.meshollama)")

    start = sub.add_parser("start", help="run a node")
    common(start)
    start.add_argument("--p2p-listen", action="append", default=S, metavar="MULTIADDR",
                       help="libp2p listen address, repeatable (default /ip4/0.0.0.0/tcp/4001 and /ip6/::/tcp/4001)")
    start.add_argument("--announce", action="append", default=S, metavar="MULTIADDR",
                       help="address to advertise instead of this machine's interfaces, repeatable "
                            "(a port forward or public IP: /ip4/203.0.113.7/tcp/4001)")
    start.add_argument("--bootstrap", action="append", default=S, metavar="MULTIADDR",
                       help="peer to join through, repeatable (/ip4/.../tcp/4001/p2p/12D3...)")
    start.add_argument("--api-listen", default=S, metavar="HOST:PORT", help="gateway address (default 127.0.0.1:11434)")
    start.add_argument("--relay-service", dest="relay_service", action="store_true", default=S,
                       help="forward connections for nodes behind NAT (run it on a reachable node)")
    start.add_argument("--relay-client", default=S, choices=["auto", "on", "off"],
                       help="reserve a slot on relays: auto (when behind NAT, default), on, off")
    start.add_argument("--no-hole-punching", dest="hole_punching", action="store_false", default=S,
                       help="keep relayed connections relayed (no DCUtR)")
    start.add_argument("--no-mdns", dest="mdns", action="store_false", default=S, help="no LAN discovery")
    start.add_argument("--no-dht", dest="dht", action="store_false", default=S, help="no Kademlia DHT")
    start.add_argument("--psk-file", default=S, help="private-network key (see meshollama keygen --psk)")
    start.add_argument("--authority", default=S, metavar="ed25519:KEY",
                       help="join the closed mesh of this authority (printed by `meshollama mesh init`)")
    start.add_argument("--heartbeat-interval", type=float, default=S, metavar="SECONDS",
                       help="shortest gap between load announcements (default 2)")
    start.add_argument("--refresh-interval", type=float, default=S, metavar="SECONDS",
                       help="longest silence of an idle node; peers expire it after 3 (default 30)")
    start.add_argument("--log-level", default=S, choices=["debug", "info", "warning", "error"])
    start.add_argument("--log-format", default=S, choices=["text", "json"])
    start.add_argument("--backend", default=S, choices=["auto", "ollama", "embedded", "none"])
    start.add_argument("--ollama-url", default=S, help="local Ollama (default http://127.0.0.1:11435)")
    start.add_argument("--spawn-ollama", dest="spawn_ollama", action="store_true", default=S,
                       help="start and supervise `ollama serve`")
    start.add_argument("--api-key-file", default=S, help="require these bearer keys on the gateway")
    start.add_argument("--model-dir", default=S, help="directory of GGUF models for the embedded backend")
    start.add_argument("--routing", default=S, choices=["least_loaded", "round_robin", "random", "local_first"])

    ident = sub.add_parser("id", help="print this node's peer ID and addresses")
    common(ident)
    ident.add_argument("--json", action="store_true")

    for name, helptext in (("peers", "list the peers in the mesh"), ("status", "show this node's mesh status"),
                           ("drain", "finish in-flight requests, take no new ones, then stop (rolling restarts)")):
        sp = sub.add_parser(name, help=helptext)
        common(sp)
        sp.add_argument("--api", default=S, metavar="URL", help="gateway URL (default: from node.json or config)")
        sp.add_argument("--api-key", default=os.environ.get("MESHOLLAMA_API_KEY"), help=S)
        if name == "drain":
            sp.add_argument("--no-wait", action="store_true", help="return once draining started")
        else:
            sp.add_argument("--json", action="store_true", help="raw JSON")

    conf = sub.add_parser("config", help="configuration tools")
    conf_sub = conf.add_subparsers(dest="config_command", required=True)
    check = conf_sub.add_parser("check", help="validate a config file without starting")
    check.add_argument("file")

    keygen = sub.add_parser("keygen", help="create keys")
    keygen.add_argument("--psk", required=True, metavar="FILE", help="write a new private-network key to FILE")

    from . import cli_keys, cli_mesh, cli_models, cli_run

    cli_mesh.add_parsers(sub, common)
    cli_keys.add_parser(sub, common)
    cli_models.add_parsers(sub, common)
    cli_run.add_parser(sub, common)
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        if hasattr(args, dest):
            out[key] = getattr(args, dest)
    if hasattr(args, "mdns"):
        out["p2p.mdns"] = args.mdns
    if hasattr(args, "dht"):
        out["p2p.dht"] = args.dht
    if hasattr(args, "relay_service"):
        out["p2p.relay_service"] = True
    if hasattr(args, "hole_punching"):
        out["p2p.hole_punching"] = args.hole_punching
    if hasattr(args, "spawn_ollama"):
        out["ollama.spawn"] = True
    return out


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(getattr(args, "config", None), os.environ, _overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"meshollama: config error: {_name_the_flag(exc)}", file=sys.stderr)
        return 2
    except (PortInUseError, IdentityError) as exc:
        print(f"meshollama: {exc}", file=sys.stderr)
        return 1
    except MeshollamaError as exc:
        print(f"meshollama: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _name_the_flag(exc: ConfigError) -> str:
    """A bad value typed on the command line is reported by its flag, not its key."""
    text = str(exc)
    flags = {key: "--" + dest.replace("_", "-") for dest, key in FLAG_KEYS.items()}
    flag = flags.get(exc.key.split("[", 1)[0])
    if flag is not None and text.endswith("(from the command line)"):
        text = f"{flag}: {exc.message[: -len('(from the command line)')].rstrip()}"
    return text


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "start":
        return _start(args)
    if args.command == "id":
        return _id(args)
    if args.command in ("peers", "status"):
        return _query(args)
    if args.command == "drain":
        return _drain(args)
    if args.command == "config":
        from .config import check_file

        check_file(args.file)
        print(f"{args.file}: ok")
        return 0
    if args.command == "keys":
        from . import cli_keys

        return cli_keys.run(args)
    if args.command in ("mesh", "admit", "revoke", "policy"):
        from . import cli_mesh

        return cli_mesh.run(args, _load, _api_url)
    if args.command in ("pull", "models", "replicate"):
        from . import cli_models

        return cli_models.run(args, _load, _api_url, http_verify)
    if args.command == "run":
        from . import cli_run

        return cli_run.run(args, _load, _api_url, http_verify)
    if args.command == "keygen":
        from .identity import write_psk

        write_psk(Path(args.psk))
        print(f"wrote private-network key to {args.psk} (mode 0600); give it to every node with --psk-file")
        return 0
    raise AssertionError(args.command)


def _start(args: argparse.Namespace) -> int:
    import trio

    from . import logs
    from .node import run_until_signalled

    config = _load(args)
    logs.setup(config.node.log_level, config.node.log_format)
    return trio.run(_run_with_errors, config, run_until_signalled)


async def _run_with_errors(config, run) -> int:
    # Errors from inside nurseries arrive wrapped in exception groups; unwrap
    # the first meshollama error so the user gets one clear line.
    try:
        return await run(config)
    except BaseExceptionGroup as group:
        leaf = _first_leaf(group)
        if isinstance(leaf, MeshollamaError):
            raise leaf from None
        raise


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        for sub in exc.exceptions:
            if isinstance(sub, MeshollamaError) or isinstance(sub, BaseExceptionGroup):
                exc = sub
                break
        else:
            exc = exc.exceptions[0]
    return exc


def _id(args: argparse.Namespace) -> int:
    from .identity import load_or_create
    from .node_setup import read_node_file
    from .p2p.keys import peer_id_of

    config = _load(args)
    peer_id = peer_id_of(load_or_create(Path(config.node.data_dir)))
    running = read_node_file(Path(config.node.data_dir)) or {}
    if running.get("peer_id") == peer_id and running.get("p2p_addrs"):
        addrs = list(running["p2p_addrs"])
    else:  # not running: what it would advertise, LAN addresses first
        from .p2p.addrs import Interfaces, advertise, interfaces

        try:
            found = interfaces()
        except Exception:  # psutil on an odd platform
            found = Interfaces((), frozenset())
        addrs = advertise(config.p2p.listen, found.ips, peer_id, announce=config.p2p.announce, virtual=found.virtual)
    if args.json:
        print(json.dumps({"peer_id": peer_id, "p2p_addrs": addrs}, indent=2))
    else:
        print(peer_id)
        for a in addrs:
            print(a)
    return 0


def _api_url(args: argparse.Namespace, config) -> str:
    from .node_setup import read_node_file

    if hasattr(args, "api"):
        return args.api.rstrip("/")
    running = read_node_file(Path(config.node.data_dir)) or {}
    if running.get("api_url"):
        return running["api_url"].rstrip("/")
    scheme = "https" if config.gateway.tls_cert is not None else "http"
    return f"{scheme}://{config.gateway.listen}"


def http_verify(config):
    """What the CLI's own requests to the local node trust: with gateway TLS, the node's
    certificate file (a self-signed certificate is its own CA), else the system CAs."""
    tls = config.gateway.tls_cert
    return str(tls) if tls is not None else True


def _query(args: argparse.Namespace) -> int:

    path = "/api/mesh/peers" if args.command == "peers" else "/api/mesh/status"
    called = _call_node(args, "GET", path, 200, timeout=5.0)
    if called is None:
        return 1
    data = called[0].json()
    if args.json:
        print(json.dumps(data, indent=2))
    elif args.command == "peers":
        print(format_peers(data))
    else:
        print(format_status(data))
    return 0


def _call_node(args: argparse.Namespace, method: str, path: str, expect: int, *, timeout: float):
    """One request to the local node's gateway: ``(response, config, url)``, or None
    after saying on stderr why it failed."""
    import httpx

    config = _load(args)
    url = _api_url(args, config)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        resp = httpx.request(method, url + path, headers=headers, timeout=timeout, verify=http_verify(config))
    except httpx.HTTPError as exc:
        print(f"meshollama: cannot reach the node at {url}: {exc} (is `meshollama start` running?)", file=sys.stderr)
        return None
    if resp.status_code != expect:
        print(f"meshollama: {url}{path} answered {resp.status_code}: {resp.text.strip()}", file=sys.stderr)
        return None
    return resp, config, url


def _drain(args: argparse.Namespace) -> int:
    """POST /api/mesh/drain, then wait until the node has stopped (it exits once drained)."""
    import time

    import httpx

    called = _call_node(args, "POST", "/api/mesh/drain", 202, timeout=10.0)
    if called is None:
        return 1
    resp, config, url = called
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    verify = http_verify(config)
    limit = float(resp.json().get("drain_timeout", config.gateway.drain_timeout)) + 30.0
    print(f"draining {url}: no new requests; waiting for those in flight (up to {limit - 30:g} s)", flush=True)
    if args.no_wait:
        return 0
    give_up = time.monotonic() + limit
    while time.monotonic() < give_up:
        try:
            httpx.get(url + "/api/version", headers=headers, timeout=2.0, verify=verify)
        except httpx.HTTPError:
            print("drained: the node has stopped")
            return 0
        time.sleep(0.2)
    print(f"meshollama: the node at {url} is still running after {limit:g} s", file=sys.stderr)
    return 1


def format_peers(data: Any) -> str:
    peers = data.get("peers", data) if isinstance(data, dict) else data
    rows = [("PEER", "STATE", "LOAD", "LAST SEEN", "MODELS")]
    for p in peers:
        load = p.get("load", {})
        models = ", ".join(m.get("name", "?") + ("*" if m.get("loaded") else "") for m in p.get("models", []))
        peer = p.get("peer_id", "?") + (" (self)" if p.get("is_self") else "")
        seen = p.get("seconds_since_heartbeat")
        rows.append((
            peer,
            str(p.get("state", "?")),
            f"{load.get('in_flight', 0)}/{load.get('capacity', 0)}" + (f" +{load['queued']}q" if load.get("queued") else ""),
            "-" if seen is None else f"{float(seen):.1f}s",
            models or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    return "\n".join(lines) + "\n(* = loaded)"


def format_status(data: dict, prefix: str = "") -> str:
    lines = []
    for k, v in data.items():
        if isinstance(v, dict) and k in ("mesh",):
            lines.append(format_status(v))
            continue
        if isinstance(v, (list, tuple)):
            v = "\n".join(" " * 25 + str(x) for x in v).strip() or "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        lines.append(f"{prefix}{k:24} {v}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
