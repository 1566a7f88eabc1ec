"""Ollama model names: parse, compare, display.

Clients name one model in many ways (``llama3``, ``llama3:latest``,
``library/llama3``, ``registry.ollama.ai/library/LLAMA3:latest``) and Ollama
treats all of them as the same local model. The mesh has to agree with it:
routing compares :func:`key` of the requested name with :func:`key` of what
peers announce, and ``/api/tags`` shows :func:`shortest`, Ollama's
``DisplayShortest``. The grammar and defaults follow Ollama's
``types/model/name.go`` (see ``shared/reference/ollama-api.md`` §1.8):

    [host/][namespace/]model[:tag]

* every part matches ``[A-Za-z0-9_][A-Za-z0-9_.-]*``;
* the host may also contain ``:`` (a port) and may be written with a
  ``http://`` or ``https://`` scheme, which is dropped;
* the namespace may not contain ``.``;
* the host is at most 350 characters, every other part at most 80;
* a ``:`` after the last ``/`` starts the tag, so ``host:11434/ns/m`` has no tag.

A separator with nothing on one side (``llama3:``, ``/llama3``) is invalid,
as in Ollama. Digest references (``model@sha256-...``) are not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BadRequest

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

MAX_HOST_LEN = 350
MAX_PART_LEN = 80

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*\Z")
_SCHEMES = ("https://", "http://")


@dataclass(frozen=True)
class ModelName:
    """A fully qualified model name; parts keep the case they were written in."""

    host: str
    namespace: str
    model: str
    tag: str

    def full(self) -> str:
        """``host/namespace/model:tag`` with the original case."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def key(self) -> str:
        """Lower-cased full form: equal keys mean the same model to Ollama."""
        return self.full().lower()

    def shortest(self) -> str:
        """Ollama's ``DisplayShortest``: drop default host and ``library/``, keep the tag."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.shortest()


def _invalid() -> BadRequest:
    return BadRequest("invalid model name")


def parse(name: str) -> ModelName:
    """Parse ``name``, filling in default host, namespace and tag.

    Raises :class:`~meshollama.errors.BadRequest` ("invalid model name") when
    ``name`` is not a string or does not follow the grammar.
    """
    if not isinstance(name, str) or not name:
        raise _invalid()
    rest = name
    tag = DEFAULT_TAG
    # '/' is illegal in a tag, so a ':' after the last '/' starts the tag;
    # one before it belongs to the host's port.
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
        if not rest or not tag:
            raise _invalid()
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if "/" in rest:
        rest, _, model = rest.rpartition("/")
        if not rest or not model:
            raise _invalid()
        if "/" in rest or "://" in rest:
            for scheme in _SCHEMES:
                if rest.lower().startswith(scheme):
                    rest = rest[len(scheme) :]
                    break
            rest, sep, namespace = rest.rpartition("/")
            if not sep or not rest or not namespace:
                raise _invalid()
            host = rest
        else:
            namespace = rest
    else:
        model = rest
    if not (
        len(host) <= MAX_HOST_LEN
        and _HOST.match(host)
        and len(namespace) <= MAX_PART_LEN
        and _NAMESPACE.match(namespace)
        and len(model) <= MAX_PART_LEN
        and _PART.match(model)
        and len(tag) <= MAX_PART_LEN
        and _PART.match(tag)
    ):
        raise _invalid()
    return ModelName(host=host, namespace=namespace, model=model, tag=tag)


def is_valid(name: str) -> bool:
    """True if :func:`parse` accepts ``name``."""
    try:
        parse(name)
    except BadRequest:
        return False
    return True


def key(name: str) -> str:
    """``parse(name).key()``; an invalid name gives ``name.lower()`` (never raises)."""
    try:
        return parse(name).key()
    except BadRequest:
        return name.lower() if isinstance(name, str) else ""


def shortest(name: str) -> str:
    """``parse(name).shortest()``; an invalid name is returned unchanged (never raises)."""
    try:
        return parse(name).shortest()
    except BadRequest:
        return name
