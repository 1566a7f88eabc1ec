from __future__ import annotations

import pytest

from meshollama import names
from meshollama.errors import BadRequest
from meshollama.names import ModelName

D = ("registry.ollama.ai", "library")


@pytest.mark.parametrize(
    "text, host, namespace, model, tag",
    [
        ("llama3", *D, "llama3", "latest"),
        ("llama3:latest", *D, "llama3", "latest"),
        ("llama3.2:3b-instruct-q4_K_M", *D, "llama3.2", "3b-instruct-q4_K_M"),
        ("library/llama3", *D, "llama3", "latest"),
        ("registry.ollama.ai/library/llama3:latest", *D, "llama3", "latest"),
        ("user/model:tag", "registry.ollama.ai", "user", "model", "tag"),
        ("hf.co/bartowski/Llama-3.2-1B-GGUF:Q4_K_M", "hf.co", "bartowski", "Llama-3.2-1B-GGUF", "Q4_K_M"),
        ("localhost:5000/ns/m", "localhost:5000", "ns", "m", "latest"),
        ("localhost:5000/ns/m:v1", "localhost:5000", "ns", "m", "v1"),
        ("https://example.com/ns/m:v1", "example.com", "ns", "m", "v1"),
        ("http://example.com:8080/ns/m", "example.com:8080", "ns", "m", "latest"),
        ("_x/_y:_z", "registry.ollama.ai", "_x", "_y", "_z"),
        ("a", *D, "a", "latest"),
        ("MiXeD/CaSe:TaG", "registry.ollama.ai", "MiXeD", "CaSe", "TaG"),
        ("m" * 80 + ":" + "t" * 80, *D, "m" * 80, "t" * 80),
        ("h" * 350 + "/n/m", "h" * 350, "n", "m", "latest"),
    ],
)
def test_parse_valid(text: str, host: str, namespace: str, model: str, tag: str) -> None:
    assert names.parse(text) == ModelName(host, namespace, model, tag)
    assert names.is_valid(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        "llama3:",
        ":latest",
        "/llama3",
        "library/",
        "/library/llama3",
        "host//m",
        "a/b/c/d",
        "a/b/c/d:e",
        "-leading-dash",
        ".leading-dot",
        "ns/.model",
        "has space",
        "tab\there",
        "uni\u00e9code",
        "m:t:t2",  # ':' in the tag
        "m@sha256-abc",  # digests are not supported
        "ns.dot/model",  # no '.' in the namespace
        "host/ns.dot/model",
        "ns:port/model",  # ':' only in the host
        "m" * 81,
        "m:" + "t" * 81,
        "n" * 81 + "/m",
        "h" * 351 + "/n/m",
        "ftp://host/ns/m",
        "https://ns/m",  # a scheme needs a host
        "llama3:la/test",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(BadRequest) as info:
        names.parse(text)
    assert info.value.message == "invalid model name"
    assert info.value.status == 400
    assert not names.is_valid(text)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(BadRequest):
        names.parse(None)  # type: ignore[arg-type]
    assert names.key(None) == ""  # type: ignore[arg-type]


EQUIVALENT = [
    "llama3",
    "llama3:latest",
    "library/llama3",
    "library/llama3:latest",
    "registry.ollama.ai/library/llama3",
    "registry.ollama.ai/library/llama3:latest",
    "LLAMA3",
    "Llama3:LATEST",
    "Library/LLaMA3",
    "REGISTRY.OLLAMA.AI/LIBRARY/LLAMA3:LATEST",
    "https://registry.ollama.ai/library/llama3",
]


@pytest.mark.parametrize("text", EQUIVALENT)
def test_equivalent_names_share_a_key(text: str) -> None:
    assert names.key(text) == "registry.ollama.ai/library/llama3:latest"


@pytest.mark.parametrize(
    "a, b",
    [
        ("llama3", "llama3:8b"),
        ("llama3", "user/llama3"),
        ("user/llama3", "other.host/user/llama3"),
        ("llama3", "llama3.1"),
    ],
)
def test_different_names_differ(a: str, b: str) -> None:
    assert names.key(a) != names.key(b)


@pytest.mark.parametrize(
    "text, short",
    [
        ("llama3", "llama3:latest"),
        ("library/llama3:8b", "llama3:8b"),
        ("registry.ollama.ai/library/llama3", "llama3:latest"),
        ("REGISTRY.ollama.ai/Library/Llama3", "Llama3:latest"),  # defaults compared case-insensitively
        ("user/model", "user/model:latest"),
        ("registry.ollama.ai/user/model:tag", "user/model:tag"),
        ("hf.co/user/model:Q4", "hf.co/user/model:Q4"),
        ("hf.co/library/model", "hf.co/library/model:latest"),  # non-default host keeps everything
        ("localhost:5000/ns/m", "localhost:5000/ns/m:latest"),
    ],
)
def test_shortest(text: str, short: str) -> None:
    assert names.shortest(text) == short
    assert names.parse(text).shortest() == short
    assert str(names.parse(text)) == short
    # The shortest form names the same model.
    assert names.key(short) == names.key(text)


def test_key_and_full_keep_structure() -> None:
    n = names.parse("User/Model:Tag")
    assert n.full() == "registry.ollama.ai/User/Model:Tag"
    assert n.key() == "registry.ollama.ai/user/model:tag"


def test_invalid_names_are_tolerated_by_key_and_shortest() -> None:
    assert names.key("Bad Name") == "bad name"
    assert names.shortest("Bad Name") == "Bad Name"


def test_model_name_is_frozen_and_hashable() -> None:
    n = names.parse("llama3")
    with pytest.raises(AttributeError):
        n.tag = "x"  # type: ignore[misc]
    assert {n, names.parse("llama3:latest")} == {n}
