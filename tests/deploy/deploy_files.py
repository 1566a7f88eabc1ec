"""Readers for the files in deploy/: a systemd unit, a Dockerfile, compose.yaml.

Small and strict: enough to check what the files say and to run the compose
topology "as written" (tests/deploy/test_compose_netns.py), not general parsers.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "meshollama.service"
ENV_FILE = DEPLOY / "systemd" / "meshollama.env"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
KUBE = DEPLOY / "kubernetes"
VENV_BIN = ROOT / ".venv" / "bin"


def unit_entries(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}``: repeated keys kept in order, comments dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(sections: dict, section: str, key: str) -> str | None:
    values = [v for k, v in sections.get(section, []) if k == key]
    return values[-1] if values else None


def env_file(path: Path = ENV_FILE) -> dict[str, str]:
    out = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV of this stage (``K=V`` pairs, quotes and ``$PATH`` left as written)."""
        out: dict[str, str] = {}
        for arg in self.all("ENV"):
            for pair in shlex.split(arg):
                key, _, value = pair.partition("=")
                out[key] = value
        return out


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[list[str], list[Stage]]:
    """Global ARGs (before the first FROM) and the stages, continuation lines joined."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not buf:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        buf += (" " if buf else "") + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        if buf:
            lines.append(buf)
        buf = ""
    global_args, stages = [], []
    for line in lines:
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = arg.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((op, arg.strip()))
        elif op == "ARG":
            global_args.append(arg.strip())
    return global_args, stages


def exec_form(arg: str) -> list[str]:
    """A JSON-array (exec form) instruction argument."""
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def kube_docs() -> list[dict]:
    """Every object of deploy/kubernetes/*.yaml, the kustomization excepted."""
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def kube_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def translate(value: str, paths: dict[str, str]) -> str:
    """Container paths in ``value`` replaced by this machine's (longest first)."""
    for container, local in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        value = value.replace(container, local)
    return value


def local_command(service: dict, image_env: dict[str, str], entrypoint: list[str], paths: dict[str, str]
                  ) -> tuple[list[str], dict[str, str]]:
    """What a compose service's container runs, as a command line and environment here:
    the image's ENTRYPOINT + the service's ``command``, the image's ENV under the
    service's ``environment``, container paths mapped by ``paths``. PATH puts the
    repository's venv first, as the image's PATH puts its venv first."""
    command = service.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    env = dict(image_env)
    declared = service.get("environment") or {}
    if isinstance(declared, list):
        declared = dict(item.split("=", 1) for item in declared)
    env.update({k: str(v) for k, v in declared.items()})
    env.pop("PATH", None)
    env = {k: translate(v, paths) for k, v in env.items()}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    argv = [translate(a, paths) for a in [*entrypoint, *command]]
    return argv, env
