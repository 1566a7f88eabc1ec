"""The deployment files say what docs/deploy.md says they do.

systemd: ``systemd-analyze verify`` and an offline ``systemd-analyze security``
of the unit, its drain and data dir, its env file against the config's keys,
and a real embedded node running under the unit's MemoryDenyWriteExecute
filter. Docker: the Dockerfile's stages, user, install step, healthcheck and
build arg; compose.yaml against the compose-spec schema and meshollama's own
flag and config checks. Kubernetes: every object against the Kubernetes
schemas (kubernetes-validate, strict), ``kubectl kustomize``, and the wiring
between objects (selectors, ports, probes, volumes, bootstrap URL).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import trio
import yaml

from meshollama.cli import _overrides, _parser
from meshollama.config import OTHER_ENV, check_file, load_config
from tests.deploy import deploy_files as df

DRAIN = load_config(None, {}, {}).gateway.drain_timeout  # the default the files must outlast
DATA_DIR = "/var/lib/meshollama"


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", str(text))
    assert m, text
    return int(m[1]) * (60 if m[2] == "min" else 1)


def config_of(argv: list[str], env: dict[str, str]):
    """What meshollama would run with: its own parser, flags over env, validated."""
    args = _parser().parse_args(argv)
    return load_config(None, {k: v for k, v in env.items() if k.startswith("MESHOLLAMA_")}, _overrides(args))


# -- systemd ---------------------------------------------------------------------------


@pytest.fixture
def unit_copy(tmp_path):
    """The unit with ExecStart pointed at this checkout's venv (verify wants the binary)."""
    text = df.UNIT.read_text().replace("/opt/meshollama/.venv/bin/meshollama", str(df.VENV_BIN / "meshollama"))
    path = tmp_path / "meshollama.service"
    path.write_text(text)
    return path


@pytest.fixture
def systemd_analyze():
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("needs systemd-analyze (Debian package systemd; scripts/install.sh installs it as root)")
    return tool


def test_unit_verifies_clean(systemd_analyze, unit_copy):
    r = subprocess.run([systemd_analyze, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    about_us = [line for line in r.stderr.splitlines() if "meshollama" in line]
    assert not about_us, "\n".join(about_us)


def test_unit_security_exposure_is_low(systemd_analyze, unit_copy):
    r = subprocess.run([systemd_analyze, "security", "--offline=true", "--no-pager", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for meshollama.service: ([\d.]+)", r.stdout)
    if m is None and "--offline" in r.stderr:
        pytest.skip(f"this systemd-analyze cannot judge a unit offline (systemd < 252): {r.stderr.strip()}")
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= 2.0, r.stdout  # 0 best, 10 worst; 1.3 when written


def test_unit_hardening_and_lifecycle():
    u = df.unit_entries()
    want = {
        "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "MemoryDenyWriteExecute": "yes", "DynamicUser": "yes", "StateDirectory": "meshollama",
        "Restart": "on-failure", "KillSignal": "SIGUSR1", "KillMode": "mixed",
        # a stop before the node handles SIGUSR1 (during start-up) is a clean stop, not a failure
        "SuccessExitStatus": "SIGUSR1",
        # a configuration or usage error (exit 2) is not retried
        "RestartPreventExitStatus": "2",
    }
    for key, value in want.items():
        assert df.unit_value(u, "Service", key) == value, key
    filters = [v for k, v in u["Service"] if k == "SystemCallFilter"]
    assert "@system-service" in filters
    assert df.unit_value(u, "Unit", "After") == "network-online.target"
    assert df.unit_value(u, "Unit", "StartLimitBurst") and df.unit_value(u, "Unit", "StartLimitIntervalSec")
    # Ollama as a dependency is there to uncomment
    text = df.UNIT.read_text()
    assert "#Wants=ollama.service" in text and "#After=ollama.service" in text
    # stop = drain, and systemd waits longer than a drain may take
    assert seconds(df.unit_value(u, "Service", "TimeoutStopSec")) > DRAIN
    assert seconds(df.unit_value(u, "Service", "TimeoutStopSec")) > float(df.env_file()["MESHOLLAMA_GATEWAY_DRAIN_TIMEOUT"])
    # the data dir is the StateDirectory (%S/meshollama), fixed by the flag
    argv = df.unit_value(u, "Service", "ExecStart").split()
    assert argv[0] == "/opt/meshollama/.venv/bin/meshollama"
    args = _parser().parse_args(argv[1:])
    assert args.command == "start" and args.data_dir == "%S/meshollama"
    # the install line in the header installs no test tools on a server
    assert "MESHOLLAMA_EXTRAS=embedded make -C /opt/meshollama install" in text


def _credentials_uncommented(text: str) -> str:
    """The unit with its commented LoadCredential= and matching Environment= lines live."""
    return re.sub(r"^#((?:LoadCredential|Environment)=)", r"\1", text, flags=re.MULTILINE)


def test_secrets_reach_the_dynamic_user_as_credentials(systemd_analyze, unit_copy, tmp_path):
    """DynamicUser cannot own a secret in /etc: the unit's example loads them with
    LoadCredential= and points the node at $CREDENTIALS_DIRECTORY (%d). Uncommented,
    the unit still verifies clean (a bad specifier would be reported), and the
    variables are the node's own settings."""
    text = _credentials_uncommented(unit_copy.read_text())
    unit_copy.write_text(text)
    u = df.unit_entries(unit_copy)
    creds = dict(v.split(":", 1) for k, v in u["Service"] if k == "LoadCredential")
    assert creds == {"api-keys": "/etc/meshollama/api-keys", "tls-key": "/etc/meshollama/tls.key",
                     "psk": "/etc/meshollama/psk"}
    env = dict(v.split("=", 1) for k, v in u["Service"] if k == "Environment")
    assert env["MESHOLLAMA_GATEWAY_API_KEY_FILE"] == "%d/api-keys"
    assert env["MESHOLLAMA_GATEWAY_TLS_KEY"] == "%d/tls-key"
    assert env["MESHOLLAMA_P2P_PSK_FILE"] == "%d/psk"
    r = subprocess.run([systemd_analyze, "verify", str(unit_copy)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    about_us = [line for line in r.stderr.splitlines() if "meshollama" in line]
    assert not about_us, "\n".join(about_us)
    # %d as systemd expands it: the variables are valid settings of the node
    creds_dir = tmp_path / "credentials"
    creds_dir.mkdir()
    (creds_dir / "api-keys").write_text("a-long-random-key-1\n")
    (creds_dir / "tls-key").write_text("")
    (creds_dir / "psk").write_text("")
    (tmp_path / "tls.crt").write_text("")
    expanded = {k: v.replace("%d", str(creds_dir)).replace("/etc/meshollama/tls.crt", str(tmp_path / "tls.crt"))
                for k, v in env.items()}
    cfg = load_config(None, expanded, {})
    assert cfg.gateway.api_keys == ("a-long-random-key-1",)
    # the env file's example names the same private copy (%d of a system unit)
    example = re.search(r"^#MESHOLLAMA_GATEWAY_API_KEY_FILE=(.*)$", df.ENV_FILE.read_text(), re.MULTILINE)
    assert example and example[1] == "/run/credentials/meshollama.service/api-keys"


def test_env_file_is_a_valid_configuration():
    env = df.env_file()
    assert env, "no settings in the env file"
    unknown = [k for k in env if not k.startswith("MESHOLLAMA_")]
    assert not unknown
    cfg = load_config(None, {k: v for k, v in env.items() if k not in OTHER_ENV}, {})
    assert cfg.gateway.drain_timeout == float(env["MESHOLLAMA_GATEWAY_DRAIN_TIMEOUT"])
    # every commented-out example line is valid too, once uncommented
    examples = {}
    for line in df.ENV_FILE.read_text().splitlines():
        m = re.fullmatch(r"#(MESHOLLAMA_[A-Z0-9_]+)=(.*)", line.strip())
        if m and "..." not in m[2] and m[1] not in OTHER_ENV and not m[1].endswith("_FILE"):
            examples[m[1]] = m[2]
    assert "MESHOLLAMA_P2P_BOOTSTRAP" in examples
    load_config(None, {**env, **examples}, {})


@pytest.mark.slow
@pytest.mark.embedded
async def test_embedded_node_runs_under_memory_deny_write_execute(tmp_path):
    """The unit sets MemoryDenyWriteExecute=yes: a whole node with the embedded
    llama.cpp engine starts and answers under the same seccomp filter."""
    from meshollama.backends.embedded import available, default_model_path

    if sys.platform != "linux" or not available() or default_model_path() is None:
        pytest.skip("needs Linux x86-64, llama-cpp-python and the SmolLM2 model (make install)")
    import os
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("the W^X filter is written for x86-64 system call numbers")
    import httpx

    data = tmp_path / "node"
    data.mkdir()
    log = tmp_path / "node.log"
    argv = [sys.executable, "-m", "tests.deploy.deploy_mdwe", str(df.VENV_BIN / "meshollama"), "start",
            "--data-dir", str(data), "--backend", "embedded", "--api-listen", "127.0.0.1:0",
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHOLLAMA_")}
    with open(log, "wb") as out:
        proc = await trio.lowlevel.open_process(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                cwd=str(df.ROOT))
    try:
        with trio.fail_after(120):
            while not (data / "node.json").exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                await trio.sleep(0.1)
            api = json.loads((data / "node.json").read_text())["api_url"]
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.post(api + "/api/chat", json={
                    "model": "smollm2:135m", "stream": False, "options": {"num_predict": 8, "seed": 1},
                    "messages": [{"role": "user", "content": "Say hi."}]})
            assert r.status_code == 200, r.text
            assert r.json()["message"]["content"].strip()
        # the filter was really there: the same wrapper refuses a W+X mapping
        probe = subprocess.run([sys.executable, "-m", "tests.deploy.deploy_mdwe", sys.executable, "-c",
                                "import mmap; mmap.mmap(-1, 4096, prot=7)"], capture_output=True, text=True,
                               cwd=str(df.ROOT), timeout=30)
        assert probe.returncode != 0 and "Operation not permitted" in probe.stderr
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


# -- Docker ------------------------------------------------------------------------------


def test_dockerfile():
    global_args, stages = df.dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the image"
    assert any(a.startswith("PYTHON_IMAGE=python:3.11-slim") for a in global_args)
    build, final = stages[0], stages[-1]
    # the install is the README's: scripts/install.sh with its knobs, as a non-root user
    installs = [r for r in build.all("RUN") if "scripts/install.sh" in r]
    assert len(installs) == 1 and "MESHOLLAMA_SKIP_SMOKE" in installs[0]
    assert not any("pip install" in r for s in stages for r in s.all("RUN")), "no second recipe beside install.sh"
    assert build.last("USER") not in (None, "root", "0")
    # EMBEDDED chooses the engine, default off
    assert "EMBEDDED=0" in build.all("ARG") and "EMBEDDED=0" in final.all("ARG")
    assert '"$EMBEDDED" = 1' in installs[0]
    # the image: non-root numeric user, volume, ports, drain on stop, health, entrypoint
    user = final.last("USER")
    assert user and user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    env = final.env()
    assert env["MESHOLLAMA_NODE_DATA_DIR"] == DATA_DIR and env["MESHOLLAMA_GATEWAY_LISTEN"].startswith("0.0.0.0:")
    assert df.exec_form(final.last("VOLUME")) == [DATA_DIR]
    assert final.last("EXPOSE").split() == ["11434", "4001"]
    assert final.last("STOPSIGNAL") == "SIGUSR1"
    health = final.last("HEALTHCHECK")
    assert health and "CMD" in health
    check = df.exec_form(health.split("CMD", 1)[1].strip())
    assert check == ["python", "/opt/meshollama/healthcheck.py"]
    assert f"COPY deploy/docker/healthcheck.py {check[1]}" in [f"COPY {c}" for c in final.all("COPY")]
    assert df.exec_form(final.last("ENTRYPOINT")) == ["meshollama"]
    assert df.exec_form(final.last("CMD")) == ["start"]
    # its ENV is a valid configuration
    load_config(None, {k: v for k, v in env.items() if k.startswith("MESHOLLAMA_")}, {})
    # the user and its group have fixed ids in every stage that creates them (bind mounts: chown 10001)
    for stage in stages:
        for run in stage.all("RUN"):
            if "useradd" in run:
                assert "groupadd" in run and "--gid 10001 meshollama" in run, run
                assert re.search(r"useradd .*--uid 10001 --gid 10001", run), run
    # bytecode is compiled at build time and shipped (read-only root at run time), not deleted
    assert not any("__pycache__" in r for s in stages for r in s.all("RUN"))
    assert "PYTHONDONTWRITEBYTECODE" not in env
    compiles = [r for r in build.all("RUN") if "compileall" in r]
    assert len(compiles) == 1 and ".venv src" in compiles[0], compiles
    assert build.all("RUN").index(compiles[0]) > build.all("RUN").index(installs[0])
    # the documented run with an Ollama elsewhere chooses kind ollama (auto asks only once, at start)
    header = df.DOCKERFILE.read_text()
    assert "-e MESHOLLAMA_BACKEND_KIND=ollama -e MESHOLLAMA_OLLAMA_URL=" in header


def test_healthcheck_script_targets_the_gateway_port():
    sys.path.insert(0, str(df.HEALTHCHECK.parent))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    assert healthcheck.url({}, "/healthz") == "http://127.0.0.1:11434/healthz"
    assert healthcheck.url({"MESHOLLAMA_GATEWAY_LISTEN": "0.0.0.0:8080"}, "/readyz") == "http://127.0.0.1:8080/readyz"
    assert healthcheck.url({"MESHOLLAMA_GATEWAY_LISTEN": "[::]:1", "MESHOLLAMA_GATEWAY_TLS_CERT": "c"},
                           "/healthz") == "https://127.0.0.1:1/healthz"
    r = subprocess.run([sys.executable, str(df.HEALTHCHECK)], capture_output=True, text=True, timeout=30,
                       env={"MESHOLLAMA_GATEWAY_LISTEN": "127.0.0.1:9"})
    assert r.returncode == 1 and "127.0.0.1:9/healthz" in r.stderr


def test_healthcheck_ignores_proxy_variables():
    """HTTP(S)_PROXY in the container (for downloads) must not send the check to a proxy:
    with a dead proxy named, a healthy node still passes, and /readyz is asked too."""
    import http.server
    import threading

    asked = []

    class Node(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dead = "http://127.0.0.1:9"
    env = {"MESHOLLAMA_GATEWAY_LISTEN": f"0.0.0.0:{server.server_address[1]}", "NO_PROXY": "", "no_proxy": "",
           **{name: dead for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy")}}
    try:
        for argv in ([], ["--ready"]):
            r = subprocess.run([sys.executable, str(df.HEALTHCHECK), *argv], capture_output=True, text=True,
                               timeout=30, env=env, check=False)
            assert r.returncode == 0, r.stderr
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/healthz", "/readyz"]


def test_docs_install_no_test_tools_on_a_server():
    """docs/deploy.md installs servers with the embedded extra (or none), never the test extra."""
    text = (df.ROOT / "docs" / "deploy.md").read_text()
    installs = [line for line in text.splitlines() if "make -C /opt/meshollama install" in line]
    assert installs
    for line in installs:
        assert "MESHOLLAMA_EXTRAS=" in line and "test" not in line.split("#")[0], line


def test_dockerignore_keeps_the_venv_out_and_the_install_in():
    patterns = [ln.strip() for ln in (df.ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    for must in (".venv", ".cache", ".git"):
        assert must in patterns
    import fnmatch

    needed = ["pyproject.toml", "README.md", "scripts/install.sh", "scripts/smoke_embedded.py",
              "src/meshollama/cli.py", "deploy/docker/healthcheck.py"]
    for path in needed:
        hit = [p for p in patterns if fnmatch.fnmatch(path, p) or path.split("/")[0] == p.rstrip("/")]
        assert not hit, f"{path} is excluded by {hit}"


def test_compose_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="needs jsonschema (pip install jsonschema)")
    schema = json.loads((df.ROOT / "tests" / "deploy" / "deploy_compose_spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(df.compose())]
    assert not errors, "\n".join(errors)
    broken = df.compose()
    broken["services"]["node1"]["healthcheck"] = {"test": ["CMD"], "intervall": "1s"}
    assert list(validator.iter_errors(broken)), "the schema must catch a misspelt key"


def test_compose_topology():
    c = df.compose()
    _, stages = df.dockerfile_stages()
    image_env = stages[-1].env()
    entry = df.exec_form(stages[-1].last("ENTRYPOINT"))
    nodes = {name: s for name, s in c["services"].items() if name.startswith("node")}
    assert sorted(nodes) == ["node1", "node2", "node3"]
    published = [name for name, s in nodes.items() if s.get("ports")]
    assert published == ["node1"], "one published API port"
    assert nodes["node1"]["ports"][0].endswith(":11434")
    for name, svc in nodes.items():
        argv, env = df.local_command(svc, image_env, entry, {})
        cfg = config_of(argv[1:], env)
        assert cfg.gateway.listen.startswith("0.0.0.0:"), name
        assert any(a.startswith("/ip4/0.0.0.0/") for a in cfg.p2p.listen), name
        assert str(cfg.node.data_dir) == DATA_DIR
        assert f"{name}:{DATA_DIR}" in svc["volumes"]
        assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/meshollama/healthcheck.py"]
        assert svc["stop_signal"] == "SIGUSR1" and seconds(svc["stop_grace_period"]) > DRAIN
        # a node in front of the ollama service says kind ollama: auto asks once, at start, and
        # depends_on does not wait for Ollama to answer; nodes on auto only ask their own loopback,
        # where no Ollama runs in their container, so their choice does not hang on timing
        if "ollama:" in cfg.ollama.url:
            assert cfg.backend.kind == "ollama", name
        else:
            assert cfg.backend.kind in ("auto", "embedded", "none"), name
            assert cfg.ollama.url.startswith("http://127.0.0.1:"), name
        if name == "node1":
            assert cfg.p2p.bootstrap == () and cfg.ollama.url == "http://ollama:11434"
        else:
            assert cfg.p2p.bootstrap == ("http://node1:11434",), name
            assert svc["depends_on"]["node1"]["condition"] == "service_healthy"
    assert set(c["volumes"]) >= {"node1", "node2", "node3"}


# -- Kubernetes -----------------------------------------------------------------------------


def _container(sts: dict) -> dict:
    return next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "meshollama")


def _uncomment_block(text: str, name: str) -> str:
    """``text`` with the lines between ``# BEGIN name`` and ``# END name`` uncommented as a
    user would: one ``# `` removed after the indentation (``# # x`` stays a comment)."""
    lines, inside, seen = [], False, False
    for line in text.splitlines():
        if line.strip() == f"# BEGIN {name}":
            inside = seen = True
            continue
        if line.strip() == f"# END {name}":
            inside = False
            continue
        lines.append(re.sub(r"^(\s*)# ?", r"\1", line, count=1) if inside else line)
    assert seen and not inside, f"no complete {name} block"
    return "\n".join(lines) + "\n"


def _sidecar_statefulset() -> dict:
    return yaml.safe_load(_uncomment_block((df.KUBE / "statefulset.yaml").read_text(), "ollama sidecar"))


def _sidecar_config_text() -> str:
    """The ConfigMap's node configuration with its sidecar lines (backend.kind: ollama, models_dir) live."""
    cm = df.kube_kind(df.kube_docs(), "ConfigMap")
    text = cm["data"]["meshollama.yaml"]
    text = re.sub(r"^(\s*)kind: auto\n", "", text, flags=re.MULTILINE)
    return re.sub(r"^(\s*)# ((?:kind: ollama|models_dir: )[^\n]*)$", r"\1\2", text, flags=re.MULTILINE)


def _restricted(sc: dict, pod_sc: dict) -> list[str]:
    """What a container breaks of the restricted Pod Security profile (the fields it checks here)."""
    problems = []
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities must drop ALL")
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        problems.append("runAsNonRoot must be true")
    if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
        problems.append("runAsUser must not be 0")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile")) or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile must be RuntimeDefault")
    if sc.get("privileged"):
        problems.append("privileged")
    return problems


def test_kubernetes_objects_pass_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate",
                             reason="needs kubernetes-validate (pip install kubernetes-validate): Kubernetes schemas")
    docs = df.kube_docs()
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked by hand below
        kv.validate(doc, "1.30.0", strict=True)
        checked += 1
    assert checked >= 7
    # the commented Ollama sidecar, uncommented, is a valid StatefulSet too
    kv.validate(_sidecar_statefulset(), "1.30.0", strict=True)
    broken = yaml.safe_load((df.KUBE / "statefulset.yaml").read_text())
    _container(broken)["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, "1.30.0", strict=True)


SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port", "path"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            },
        },
    },
}


def test_kubernetes_wiring():
    docs = df.kube_docs()
    sts = df.kube_kind(docs, "StatefulSet")
    headless = df.kube_kind(docs, "Service", sts["spec"]["serviceName"])
    api = df.kube_kind(docs, "Service", "meshollama")
    monitor = df.kube_kind(docs, "ServiceMonitor")
    cm = df.kube_kind(docs, "ConfigMap")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    c = _container(sts)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 11434, "p2p": 4001}

    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # headless: selects the pods, no cluster IP, names resolve before readiness (pods join through them)
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    for svc in (headless, api):
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports and ports[p["targetPort"]] == p["port"]
    # the bootstrap URL names pod 0 of the headless service, on the API port
    env = {e["name"]: e for e in c["env"]}
    url = env["BOOTSTRAP_URL"]["value"]
    assert url == f"http://{sts['metadata']['name']}-0.{headless['metadata']['name']}:{ports['http']}"
    assert '--bootstrap "$BOOTSTRAP_URL"' in c["args"][0] and '"${POD_NAME##*-}" = "0"' in c["args"][0]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # no MESHOLLAMA_* service-link variables (the node refuses unknown ones), and ours are known
    assert pod["enableServiceLinks"] is False
    ours = {k for k in env if k.startswith("MESHOLLAMA_") and k not in OTHER_ENV}
    assert ours == {"MESHOLLAMA_GATEWAY_API_KEYS"}
    load_config(None, {"MESHOLLAMA_GATEWAY_API_KEYS": "k1,k2"}, {})  # the Secret's value format
    assert env["MESHOLLAMA_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # probes: liveness and startup on /healthz, readiness on /readyz, on the API port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # the volume claim holds the data dir; the config file is the ConfigMap's
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    assert mounts[claim] == DATA_DIR
    config_path = env["MESHOLLAMA_CONFIG"]["value"]
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    assert config_path == f"{mounts['config']}/meshollama.yaml" and "meshollama.yaml" in cm["data"]
    # security: non-root, no capabilities, read-only root, drain outlasted
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["terminationGracePeriodSeconds"] > DRAIN
    # the ServiceMonitor scrapes /metrics through the API Service's labels and port name
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= api["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in api["spec"]["ports"]}


def test_the_ollama_sidecar_once_uncommented(tmp_path):
    """The sidecar in statefulset.yaml works if uncommented: a native sidecar (it outlives
    the node's drain), restricted Pod Security, HOME and models on the data volume, and the
    ConfigMap's commented lines point the node at it with kind ollama."""
    sts = _sidecar_statefulset()
    pod = sts["spec"]["template"]["spec"]
    node = _container(sts)
    [sidecar] = pod["initContainers"]
    assert sidecar["name"] == "ollama" and sidecar["restartPolicy"] == "Always"
    for container in (node, sidecar):
        assert not _restricted(container["securityContext"], pod["securityContext"]), container["name"]
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["data"] == DATA_DIR
    assert env["HOME"].startswith(DATA_DIR + "/") and env["OLLAMA_MODELS"].startswith(DATA_DIR + "/")
    if sidecar["securityContext"].get("readOnlyRootFilesystem"):
        assert mounts.get("tmp") == "/tmp"
    path = tmp_path / "meshollama.yaml"
    path.write_text(_sidecar_config_text())
    cfg = check_file(path)
    assert cfg.backend.kind == "ollama"
    assert str(cfg.ollama.models_dir) == env["OLLAMA_MODELS"]
    assert cfg.ollama.url == f"http://{env['OLLAMA_HOST']}"
    # and the files as shipped have neither
    assert "initContainers" not in df.kube_kind(df.kube_docs(), "StatefulSet")["spec"]["template"]["spec"]


def test_kubernetes_network_policy():
    docs = df.kube_docs()
    sts = df.kube_kind(docs, "StatefulSet")
    policy = df.kube_kind(docs, "NetworkPolicy")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"].items() <= labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in spec["ingress"]}
    assert set(rules) == {("p2p",), ("http",)}
    # p2p only from the StatefulSet's own pods; the API from any pod of the namespace
    [peers] = rules[("p2p",)]
    assert set(peers) == {"podSelector"} and peers["podSelector"]["matchLabels"].items() <= labels.items()
    assert rules[("http",)] == [{"podSelector": {}}]
    ports = {p["name"] for p in _container(sts)["ports"]}
    assert {"p2p", "http"} <= ports


def test_kubernetes_config_file_is_valid_and_matches_the_pod(tmp_path):
    cm = df.kube_kind(df.kube_docs(), "ConfigMap")
    path = tmp_path / "meshollama.yaml"
    path.write_text(cm["data"]["meshollama.yaml"])
    cfg = check_file(path)
    assert str(cfg.node.data_dir) == DATA_DIR
    assert cfg.gateway.listen == "0.0.0.0:11434" and cfg.p2p.mdns is False
    assert cfg.gateway.drain_timeout < df.kube_kind(df.kube_docs(), "StatefulSet")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]


def test_kustomize_renders_everything():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("needs kubectl (for `kubectl kustomize`)")
    r = subprocess.run([kubectl, "kustomize", str(df.KUBE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == ["ConfigMap", "Namespace", "NetworkPolicy", "Service", "Service", "StatefulSet"]
    assert all(d["metadata"].get("namespace", "meshollama") == "meshollama" for d in rendered)

