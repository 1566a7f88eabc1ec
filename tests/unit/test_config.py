"""config.py: layering, parsing, validation, and that the example file and docs match the schema.

Pure tests: files live in tmp_path and the environment is always an explicit dict.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from meshollama.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    Config,
    check_file,
    config_to_dict,
    load_config,
)
from meshollama.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "meshollama.yaml"
DOCS = ROOT / "docs" / "configuration.md"
PEER = "12D3KooWGzh5VRZEzEXqkDdBSPdrCVgqs6S6Q9xG6RJ8ShE4vRHw"
BOOT = f"/ip4/192.0.2.1/tcp/4001/p2p/{PEER}"


def load(env=None, overrides=None, path=None) -> Config:
    return load_config(path, env=env or {}, overrides=overrides)


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{info.value.key}: ")
    return info.value


def all_keys() -> dict[str, list[str]]:
    return {s.name: [f.name for f in dataclasses.fields(s.default_factory)] for s in dataclasses.fields(Config)}


# --- defaults -----------------------------------------------------------------

SPEC_DEFAULTS = {
    "node": {"log_level": "info", "log_format": "text"},
    "p2p": {
        "listen": ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"), "announce": (), "bootstrap": (),
        "relay_service": False, "relay_client": "auto", "hole_punching": True, "relay_max_reservations": 128,
        "relay_max_circuits": 16, "relay_circuit_seconds": 3600, "relay_circuit_bytes": 1 << 30, "mdns": True, "dht": True, "psk_file": None,
        "heartbeat_interval": 2.0, "refresh_interval": 30.0, "refresh_per_peer": 10.0, "full_view_up_to": 32, "load_max_silence": 10.0, "miss_limit": 3, "liveness_interval": 1.0, "liveness_timeout": 2.0, "liveness_ping_all_up_to": 16,
        "gossip_degree": 3, "gossip_degree_low": 2, "gossip_degree_high": 4, "stream_timeout": 10.0,
        "max_inbound_streams": 256, "max_inbound_per_peer": 64, "bootstrap_retry_max": 30.0,
        "max_request_bytes": 32 * 1024 * 1024, "max_buffered_bytes": 256 * 1024 * 1024,
        "request_timeout": 60.0, "max_peers": 4096,
    },
    "mesh": {"authority": "", "admission_timeout": 10.0},
    "gateway": {
        "listen": "127.0.0.1:11434", "api_keys": (), "api_key_file": None, "max_body_bytes": 32 * 1024 * 1024,
        "routing": "least_loaded", "retries": 2, "sideline_seconds": 10.0, "connect_timeout": 10.0,
        "first_byte_timeout": 300.0, "stall_timeout": 60.0, "resume": True, "queue_size": 64,
        "queue_timeout": 120.0, "drain_timeout": 120.0,
        "cors_origins": (), "max_concurrent": 256, "allowed_hosts": (), "tls_cert": None, "tls_key": None,
        "tls_client_ca": None, "jwt_secret_file": None, "jwt_public_key_file": None, "jwt_role_claim": "role",
        "jwt_audience": "", "jwt_issuer": "",
    },
    "backend": {"kind": "auto"},
    "ollama": {
        "url": "http://127.0.0.1:11435", "num_parallel": 1, "spawn": False, "binary": "ollama",
        "refresh_interval": 5.0, "probe_timeout": 1.0, "models_dir": None,
    },
    "embedded": {
        "model_dir": None, "default_model": True, "parallel": 1, "max_queue": 8, "n_ctx": 8192,
        "n_threads": 0, "embedding": True,
    },
    "models": {
        "pull_from_peers": True, "serve": True, "serve_rate": 0.0, "serve_streams": 16, "serve_per_peer": 4,
        "replicas": (), "accept_replicas": True, "min_free_bytes": 2 * 1024**3, "replica_grace": 120.0,
        "labels": (),
    },
    "tracing": {"otlp_endpoint": "", "service_name": "meshollama", "sample_ratio": 1.0, "headers": ()},
}


def test_defaults_match_the_spec():
    cfg = load()
    assert cfg == Config()
    assert cfg.node.data_dir == Path("~/.meshollama").expanduser()
    assert "~" not in str(cfg.node.data_dir)
    for section, values in SPEC_DEFAULTS.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value and type(got) is type(value), f"{section}.{key}"
    assert set(all_keys()) == set(SPEC_DEFAULTS)
    for section, keys in all_keys().items():
        assert set(keys) - {"data_dir"} == set(SPEC_DEFAULTS[section]), section


def test_config_is_frozen():
    cfg = load(overrides={"p2p.listen": ["/ip4/127.0.0.1/tcp/0"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p2p.heartbeat_interval = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p2p = cfg.p2p  # type: ignore[misc]
    assert isinstance(cfg.p2p.listen, tuple)


# --- layering -----------------------------------------------------------------


def test_each_layer_overrides_the_one_below(tmp_path):
    path = write(tmp_path, "p2p:\n  heartbeat_interval: 3\n  miss_limit: 5\n  liveness_interval: 0.5\n")
    env = {"MESHOLLAMA_P2P_HEARTBEAT_INTERVAL": "4", "MESHOLLAMA_P2P_MISS_LIMIT": "6"}
    overrides = {"p2p.heartbeat_interval": 5.0}

    assert load(path=path).p2p.heartbeat_interval == 3.0
    cfg = load(path=path, env=env)
    assert (cfg.p2p.heartbeat_interval, cfg.p2p.miss_limit, cfg.p2p.liveness_interval) == (4.0, 6, 0.5)
    cfg = load(path=path, env=env, overrides=overrides)
    assert (cfg.p2p.heartbeat_interval, cfg.p2p.miss_limit, cfg.p2p.liveness_interval) == (5.0, 6, 0.5)
    assert cfg.p2p.liveness_timeout == 2.0  # untouched keys keep their defaults


def test_config_file_from_environment(tmp_path):
    a = write(tmp_path, "node: {log_level: debug}\n", "a.yaml")
    b = write(tmp_path, "node: {log_level: error}\n", "b.yaml")
    assert load(env={CONFIG_ENV: str(a)}).node.log_level == "debug"
    assert load(env={CONFIG_ENV: str(a)}, path=b).node.log_level == "error"  # --config wins
    assert load(env={CONFIG_ENV: ""}) == Config()


def test_missing_config_file(tmp_path):
    err = error(path=tmp_path / "nope.yaml")
    assert err.key == "file" and "no such file" in err.message
    assert error(env={CONFIG_ENV: str(tmp_path / "nope.yaml")}).key == "file"


def test_overrides_accept_typed_values_and_flag_strings():
    cfg = load(overrides={
        "p2p.bootstrap": [BOOT], "node.data_dir": "/x", "p2p.heartbeat_interval": "0.5", "p2p.mdns": False,
        "gateway.listen": "127.0.0.1:0", "p2p.psk_file": None, "embedded.model_dir": Path("~/models"),
    })
    assert cfg.p2p.bootstrap == (BOOT,)
    assert cfg.node.data_dir == Path("/x")
    assert cfg.p2p.heartbeat_interval == 0.5
    assert cfg.p2p.mdns is False
    assert cfg.gateway.listen == "127.0.0.1:0"
    assert cfg.embedded.model_dir == Path("~/models").expanduser()


@pytest.mark.parametrize(("key", "section_or_key"), [("gateway.colour", "gateway.colour"), ("foo.bar", "foo")])
def test_unknown_override(key, section_or_key):
    assert error(overrides={key: 1}).key == section_or_key


# --- environment --------------------------------------------------------------


def test_env_lists_are_comma_separated():
    other = f"/ip6/::1/tcp/4002/p2p/{PEER}"
    cfg = load(env={
        "MESHOLLAMA_P2P_BOOTSTRAP": f" {BOOT} , {other},",
        "MESHOLLAMA_P2P_LISTEN": "/ip4/127.0.0.1/tcp/0,/ip6/::1/tcp/0",
        "MESHOLLAMA_GATEWAY_API_KEYS": "",
    })
    assert cfg.p2p.bootstrap == (BOOT, other)
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0", "/ip6/::1/tcp/0")
    assert cfg.gateway.api_keys == ()


@pytest.mark.parametrize(("text", "value"), [
    ("1", True), ("true", True), ("YES", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False),
])
def test_env_bools(text, value):
    assert load(env={"MESHOLLAMA_P2P_MDNS": text}).p2p.mdns is value


def test_env_numbers_strings_and_paths():
    cfg = load(env={
        "MESHOLLAMA_P2P_HEARTBEAT_INTERVAL": "2", "MESHOLLAMA_GATEWAY_MAX_BODY_BYTES": "1024",
        "MESHOLLAMA_GATEWAY_LISTEN": "127.0.0.1:0", "MESHOLLAMA_NODE_LOG_LEVEL": "DEBUG",
        "MESHOLLAMA_NODE_DATA_DIR": "~/mesh", "MESHOLLAMA_P2P_PSK_FILE": "",
    })
    assert cfg.p2p.heartbeat_interval == 2.0 and isinstance(cfg.p2p.heartbeat_interval, float)
    assert cfg.gateway.max_body_bytes == 1024
    assert cfg.gateway.listen == "127.0.0.1:0"
    assert cfg.node.log_level == "debug"
    assert cfg.node.data_dir == Path("~/mesh").expanduser()
    assert cfg.p2p.psk_file is None


@pytest.mark.parametrize(("var", "text", "key"), [
    ("MESHOLLAMA_P2P_HEARTBEAT_INTERVAL", "abc", "p2p.heartbeat_interval"),
    ("MESHOLLAMA_P2P_HEARTBEAT_INTERVAL", "nan", "p2p.heartbeat_interval"),
    ("MESHOLLAMA_P2P_MISS_LIMIT", "2.0", "p2p.miss_limit"),
    ("MESHOLLAMA_P2P_MDNS", "maybe", "p2p.mdns"),
    ("MESHOLLAMA_NODE_DATA_DIR", "", "node.data_dir"),
    ("MESHOLLAMA_P2P_LISTEN", "", "p2p.listen"),
])
def test_env_bad_values_name_key_and_variable(var, text, key):
    err = error(env={var: text})
    assert err.key == key
    assert var in err.message and repr(text) in err.message


def test_unknown_env_variable_is_an_error():
    err = error(env={"MESHOLLAMA_P2P_HEARTBEAT": "2"})
    assert err.key == "MESHOLLAMA_P2P_HEARTBEAT"
    assert "MESHOLLAMA_P2P_HEARTBEAT_INTERVAL" in err.message  # the suggestion
    assert error(env={"MESHOLLAMA_FOO_BAR": "1"}).key == "MESHOLLAMA_FOO_BAR"


def test_env_ignores_other_variables():
    env = {"PATH": "/bin", "OLLAMA_HOST": "x", "MESHOLLAMA_API_KEY": "k", "meshollama_p2p_mdns": "0"}
    assert load(env=env) == Config()


# --- YAML file ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n", "p2p:\n", "p2p: {}\n"])
def test_empty_file_and_sections_are_fine(tmp_path, text):
    assert load(path=write(tmp_path, text)) == Config()


def test_file_values(tmp_path):
    path = write(tmp_path, f"""
node: {{data_dir: ~/m, log_format: json}}
p2p:
  listen: [/ip4/127.0.0.1/tcp/0, "/ip6/::/tcp/4001"]
  bootstrap: [{BOOT}]
  mdns: no
  heartbeat_interval: 1
gateway:
  listen: "[::1]:8080"
  cors_origins: ["*", https://app.example.com/]
ollama: {{url: "http://10.0.0.2:11434/"}}
embedded: {{model_dir: /models}}
""")
    cfg = load(path=path)
    assert cfg.node.data_dir == Path("~/m").expanduser()
    assert cfg.node.log_format == "json"
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0", "/ip6/::/tcp/4001")
    assert cfg.p2p.bootstrap == (BOOT,)
    assert cfg.p2p.mdns is False
    assert cfg.p2p.heartbeat_interval == 1.0 and isinstance(cfg.p2p.heartbeat_interval, float)
    assert cfg.gateway.listen == "[::1]:8080"
    assert cfg.gateway.cors_origins == ("*", "https://app.example.com")
    assert cfg.ollama.url == "http://10.0.0.2:11434"
    assert cfg.embedded.model_dir == Path("/models")


def test_unknown_section(tmp_path):
    err = error(path=write(tmp_path, "foo:\n  bar: 1\n"))
    assert err.key == "foo" and "unknown section 'foo'" in err.message and "p2p" in err.message


def test_unknown_key_lists_known_keys(tmp_path):
    err = error(path=write(tmp_path, "gateway:\n  colour: red\n"))
    assert err.key == "gateway.colour"
    assert err.message.startswith("unknown key (known: listen, api_keys, ")


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("p2p: {heartbeat_interval: abc}", "p2p.heartbeat_interval", "expected a number"),
    ('p2p: {heartbeat_interval: "2"}', "p2p.heartbeat_interval", "expected a number"),
    ("p2p: {heartbeat_interval: true}", "p2p.heartbeat_interval", "expected a number"),
    ("p2p: {heartbeat_interval: .inf}", "p2p.heartbeat_interval", "expected a number"),
    ("p2p: {miss_limit: true}", "p2p.miss_limit", "expected an integer"),
    ("p2p: {miss_limit: 3.0}", "p2p.miss_limit", "expected an integer"),
    ('p2p: {mdns: "true"}', "p2p.mdns", "expected true or false"),
    ("p2p: {mdns: 1}", "p2p.mdns", "expected true or false"),
    (f"p2p: {{bootstrap: {BOOT}}}", "p2p.bootstrap", "expected a list"),
    ("p2p: {listen: []}", "p2p.listen", "at least one"),
    ("gateway: {listen: 8080}", "gateway.listen", "expected HOST:PORT"),
    ("gateway: {api_keys: [1]}", "gateway.api_keys[0]", "expected an API key"),
    ("gateway: {routing: fastest}", "gateway.routing", "expected one of least_loaded, round_robin"),
    ("node: {data_dir: 3}", "node.data_dir", "expected a file system path"),
    ("node: {data_dir: null}", "node.data_dir", "expected a file system path"),
    ("ollama: {binary: ''}", "ollama.binary", "expected a non-empty string"),
    ("ollama: {url: 'localhost:11435'}", "ollama.url", "expected an http:// or https:// URL"),
    ("p2p: [1, 2]", "p2p", "expected a mapping of keys"),
])
def test_wrong_types_are_errors(tmp_path, text, key, expected):
    path = write(tmp_path, text + "\n")
    err = error(path=path)
    assert err.key == key
    assert expected in err.message and str(path) in err.message


@pytest.mark.parametrize(("key", "low_ok", "low_bad", "high_ok", "high_bad"), [
    ("p2p.heartbeat_interval", 0.05, 0.04, 3600, 3600.5),
    ("p2p.miss_limit", 2, 1, 10**6, None),
    ("p2p.liveness_timeout", 0.001, 0, 1e6, None),
    ("gateway.retries", 0, -1, 100, None),
    ("gateway.sideline_seconds", 0, -0.1, 100, None),
    ("embedded.n_threads", 0, -1, 64, None),
])
def test_numeric_bounds(key, low_ok, low_bad, high_ok, high_bad):
    section, name = key.split(".")
    assert getattr(getattr(load(overrides={key: low_ok}), section), name) == low_ok
    assert getattr(getattr(load(overrides={key: high_ok}), section), name) == high_ok
    for bad in (low_bad, high_bad):
        if bad is not None:
            assert error(overrides={key: bad}).key == key


@pytest.mark.parametrize(("text", "problem"), [
    ("p2p: {mdns: [}\n", "invalid YAML at line 1"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("just a string\n", "expected a mapping of sections"),
    ("p2p:\n  mdns: true\np2p:\n  dht: true\n", "duplicate key 'p2p'"),
    ("p2p:\n  mdns: true\n  mdns: false\n", "duplicate key 'mdns'"),
])
def test_bad_yaml_names_the_file(tmp_path, text, problem):
    path = write(tmp_path, text)
    err = error(path=path)
    assert err.key == "file"
    assert problem in err.message and str(path) in err.message


# --- particular values ----------------------------------------------------------


def test_bad_multiaddr_names_the_item():
    err = error(overrides={"p2p.bootstrap": [BOOT, "/ip4/1.2.3/tcp/1"]})
    assert err.key == "p2p.bootstrap[1]"
    assert err.message.startswith("not a valid multiaddr '/ip4/1.2.3/tcp/1': ")
    assert "1.2.3" in err.message.partition(": ")[2]


@pytest.mark.parametrize("addr", ["/ip4/192.0.2.1/tcp/4001", f"/p2p/{PEER}", "garbage", ""])
def test_bootstrap_must_end_in_peer_id(addr):
    assert error(overrides={"p2p.bootstrap": [addr]}).key == "p2p.bootstrap[0]"


@pytest.mark.parametrize("addr", [f"/dns4/boot.example.com/tcp/4001/p2p/{PEER}", f"/ip6/::1/tcp/1/p2p/{PEER}"])
def test_bootstrap_accepts_dialable_addresses(addr):
    assert load(overrides={"p2p.bootstrap": [addr]}).p2p.bootstrap == (addr,)


@pytest.mark.parametrize("addr", ["/ip4/0.0.0.0/udp/4001", "/dns4/example.com/tcp/1", f"{BOOT}", "/ip4/0.0.0.0"])
def test_listen_must_be_ip_tcp(addr):
    err = error(overrides={"p2p.listen": [addr]})
    assert err.key == "p2p.listen[0]" and "/tcp/<port>" in err.message


@pytest.mark.parametrize("value", ["127.0.0.1:11434", "0.0.0.0:0", "localhost:65535", "[::1]:80", "[::]:1"])
def test_host_port_ok(value):
    assert load(overrides={"gateway.listen": value}).gateway.listen == value


@pytest.mark.parametrize("value", ["127.0.0.1", ":80", "::1:80", "[zz]:80", "host:65536", "host:-1", "a b:1",
                                   "host:http"])
def test_host_port_bad(value):
    err = error(overrides={"gateway.listen": value})
    assert err.key == "gateway.listen" and "HOST:PORT" in err.message


def test_gossip_degree_ordering():
    assert load(overrides={"p2p.gossip_degree_low": 3, "p2p.gossip_degree_high": 3}).p2p.gossip_degree == 3
    err = error(overrides={"p2p.gossip_degree": 5})
    assert err.key == "p2p.gossip_degree" and "2 <= 5 <= 4" in err.message
    assert error(env={"MESHOLLAMA_P2P_GOSSIP_DEGREE_LOW": "4"}).key == "p2p.gossip_degree"


def test_inbound_per_peer_at_most_total():
    err = error(overrides={"p2p.max_inbound_streams": 32})
    assert err.key == "p2p.max_inbound_per_peer"


# --- API keys -------------------------------------------------------------------


def test_api_key_file_is_merged(tmp_path):
    keys = write(tmp_path, "# gateway keys\nk2\n\n  k3  \nk1\n", "keys")
    cfg = load(path=write(tmp_path, f"gateway:\n  api_keys: [k1, k2]\n  api_key_file: {keys}\n"))
    assert cfg.gateway.api_keys == ("k1", "k2", "k3")
    assert cfg.gateway.api_key_file == keys
    env = {"MESHOLLAMA_GATEWAY_API_KEY_FILE": str(keys)}
    assert load(env=env).gateway.api_keys == ("k2", "k3", "k1")


@pytest.mark.parametrize(("text", "problem"), [
    (None, "no such file"), ("# nothing\n\n", "no keys"), ("good\nbad key\n", "line 2"),
])
def test_api_key_file_problems(tmp_path, text, problem):
    path = tmp_path / "keys"
    if text is not None:
        path.write_text(text)
    err = error(overrides={"gateway.api_key_file": str(path)})
    assert err.key == "gateway.api_key_file" and problem in err.message


# --- printing -------------------------------------------------------------------


def test_config_to_dict_round_trips(tmp_path):
    cfg = load(overrides={
        "p2p.bootstrap": [BOOT], "gateway.api_keys": ["s3cr3t-key"], "p2p.psk_file": "/k", "node.data_dir": "/d",
    })
    shown = config_to_dict(cfg)
    assert shown["gateway"]["api_keys"] == ["***"]
    assert shown["p2p"]["bootstrap"] == [BOOT]
    assert shown["p2p"]["psk_file"] == "/k" and shown["node"]["data_dir"] == "/d"
    assert shown["embedded"]["model_dir"] is None
    assert "s3cr3t-key" not in repr(shown)

    full = config_to_dict(cfg, redact=False)
    path = write(tmp_path, yaml.safe_dump(full))
    assert check_file(path) == cfg


def test_check_file_reads_only_the_file(tmp_path):
    path = write(tmp_path, "backend: {kind: none}\n")
    assert check_file(path) == load(path=path)
    assert check_file(path).backend.kind == "none"
    with pytest.raises(ConfigError) as info:
        check_file(write(tmp_path, "backend: {kind: gpu}\n"))
    assert info.value.key == "backend.kind"


# --- the example file and the docs follow the schema ---------------------------


def test_example_file_is_valid_and_all_defaults():
    assert check_file(EXAMPLE) == Config()
    data = yaml.safe_load(EXAMPLE.read_text())
    assert {s: list(keys) for s, keys in data.items()} == all_keys()  # every key, in schema order


def _doc_tables() -> dict[str, dict[str, list[str]]]:
    """``### `section` `` headings followed by a table: section -> key -> cells."""
    tables: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in DOCS.read_text().splitlines():
        if m := re.fullmatch(r"### `(\w+)`", line.strip()):
            section = m[1]
            tables[section] = {}
        elif section and (m := re.match(r"\| `(\w+)` \|", line)):
            tables[section][m[1]] = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    return tables


def test_docs_describe_every_key():
    tables = _doc_tables()
    defaults = config_to_dict(Config(), redact=False)
    assert {s: list(rows) for s, rows in tables.items()} == all_keys()
    for section, rows in tables.items():
        for key, (_, _type, default, env, meaning) in rows.items():
            assert env == f"`{ENV_PREFIX}{section.upper()}_{key.upper()}`"
            assert meaning
            if key != "data_dir":  # shown unexpanded
                documented = yaml.safe_load(re.match(r"`([^`]*)`", default)[1])
                assert documented == defaults[section][key], f"{section}.{key}"
    text = DOCS.read_text()
    for needle in ("MESHOLLAMA_CONFIG", "meshollama config check", "OLLAMA_HOST=127.0.0.1:11435", "--api-listen"):
        assert needle in text
