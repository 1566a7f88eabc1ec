"""What a node is built from and what it leaves behind: the libp2p host's and the
mesh's settings read off the config, and ``node.json`` in the data directory (the
running node's peer id, addresses and API URL, for ``meshollama peers/status`` and
for tests and benchmarks that start nodes)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import Config
from .mesh.settings import MeshSettings
from .p2p.host import HostSettings
from .p2p.relay import RelaySettings

NODE_FILE = "node.json"


@dataclass(frozen=True)
class NodeInfo:
    peer_id: str
    p2p_addrs: tuple[str, ...]
    api_url: str
    backend: str

    def to_json(self) -> dict:
        return {"peer_id": self.peer_id, "p2p_addrs": list(self.p2p_addrs), "api_url": self.api_url,
                "backend": self.backend, "pid": os.getpid(), "version": __version__}


def host_settings(config: Config, psk: str | None) -> HostSettings:
    p = config.p2p
    return HostSettings(
        listen=tuple(p.listen),
        psk=psk,
        mdns=p.mdns,
        dht=p.dht,
        gossip_degree=p.gossip_degree,
        gossip_degree_low=p.gossip_degree_low,
        gossip_degree_high=p.gossip_degree_high,
        stream_timeout=p.stream_timeout,
        announce=tuple(p.announce),
        relay=RelaySettings(
            service=p.relay_service,
            client=p.relay_client,
            hole_punching=p.hole_punching,
            max_reservations=p.relay_max_reservations,
            max_circuits=p.relay_max_circuits,
            circuit_seconds=p.relay_circuit_seconds,
            circuit_bytes=p.relay_circuit_bytes,
            announced=bool(p.announce),
        ),
    )


def mesh_settings(config: Config, api_url: str) -> MeshSettings:
    p = config.p2p
    return MeshSettings(
        heartbeat_interval=p.heartbeat_interval,
        refresh_interval=p.refresh_interval,
        refresh_per_peer=p.refresh_per_peer,
        load_max_silence=p.load_max_silence,
        full_view_up_to=p.full_view_up_to,
        miss_limit=p.miss_limit,
        liveness_interval=p.liveness_interval,
        liveness_timeout=p.liveness_timeout,
        liveness_ping_all_up_to=p.liveness_ping_all_up_to,
        bootstrap=tuple(p.bootstrap),
        bootstrap_retry_max=p.bootstrap_retry_max,
        api_url=api_url,
        connect_timeout=config.gateway.connect_timeout,
        max_peers=p.max_peers,
    )


def write_node_file(data_dir: Path, info: NodeInfo) -> Path:
    path = Path(data_dir) / NODE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_node_file(data_dir: Path) -> dict | None:
    try:
        return json.loads((Path(data_dir) / NODE_FILE).read_text())
    except (OSError, ValueError):
        return None
