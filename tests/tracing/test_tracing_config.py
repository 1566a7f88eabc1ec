"""The ``tracing`` config section: what it refuses, and that a refusal or a printout never shows a secret."""

from __future__ import annotations

import dataclasses

import pytest

from meshollama.config import Config, TracingConfig, config_to_dict, load_config
from meshollama.errors import ConfigError

SECRET = "sk-SECRET-TOKEN-123"


def refused(tmp_path, yaml_text: str = "", env: dict[str, str] | None = None) -> str:
    path = None
    if yaml_text:
        path = tmp_path / "m.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return str(info.value)


@pytest.mark.parametrize("entry", [
    f"authorization: Bearer {SECRET}",  # a colon for "=": no "=" at all
    f"auth orization=Bearer {SECRET}",  # not an HTTP token
    f"authorization=Bearer {SECRET}\u00e9",  # httpx cannot encode it
    f"authorization=Bearer\t{SECRET}",
])
def test_a_bad_header_is_refused_without_showing_its_value(tmp_path, entry):
    message = refused(tmp_path, f"tracing:\n  headers: [{entry!r}]\n".replace("'", '"'))
    assert "tracing.headers[0]" in message and SECRET not in message


@pytest.mark.parametrize("value", [f"{{authorization: Bearer {SECRET}}}", f"authorization=Bearer {SECRET}"])
def test_headers_of_the_wrong_shape_are_not_echoed(tmp_path, value):
    # A mapping as the item, or one string instead of a list.
    text = (f"tracing:\n  headers: [{value}]\n" if value.startswith("{") else f"tracing:\n  headers: {value}\n")
    message = refused(tmp_path, text)
    assert "tracing.headers" in message and SECRET not in message


def test_a_non_ascii_header_from_the_environment_is_refused():
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"MESHOLLAMA_TRACING_HEADERS": "x-team=caf\u00e9"})
    assert "'x-team'" in str(info.value) and "caf" not in str(info.value)


def test_good_headers_are_normalised():
    cfg = load_config(None, env={"MESHOLLAMA_TRACING_HEADERS": " Authorization = Bearer a b , X-Empty="})
    assert cfg.tracing.headers == ("authorization=Bearer a b", "x-empty=")


def test_a_comma_in_an_environment_header_value_cannot_pass_silently_cut():
    # Entries are split at commas: the piece after the comma is not NAME=VALUE, so it is refused.
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"MESHOLLAMA_TRACING_HEADERS": f"authorization=Bearer {SECRET},more"})
    assert "tracing.headers[1]" in str(info.value) and "comma" in str(info.value)
    assert SECRET not in str(info.value)


def test_credentials_in_the_endpoint_are_refused_and_not_shown(tmp_path):
    message = refused(tmp_path, "tracing:\n  otlp_endpoint: http://alice:hunter2@127.0.0.1:4318\n")
    assert "tracing.otlp_endpoint" in message and "tracing.headers" in message
    assert "hunter2" not in message and "alice" not in message


@pytest.mark.parametrize("url", ["http://c:4318/?tenant=a", "http://c:4318#x", "http://c:4318/otel?",
                                 "http://c:99999", "http://c 1:4318", "http://c:4318/a b", "ftp://c:4318"])
def test_endpoints_the_exporter_could_not_use_are_refused(url):
    with pytest.raises(ConfigError):
        load_config(None, env={"MESHOLLAMA_TRACING_OTLP_ENDPOINT": url})


@pytest.mark.parametrize("url", ["http://127.0.0.1:4318", "https://otlp.example.com/otel/", "http://[::1]:4318"])
def test_endpoints_accepted(url):
    cfg = load_config(None, env={"MESHOLLAMA_TRACING_OTLP_ENDPOINT": url})
    assert cfg.tracing.otlp_endpoint == url.rstrip("/")


def test_config_printout_redacts_header_values_and_endpoint_credentials():
    # The loader refuses userinfo; a TracingConfig built in code is still printed safely.
    cfg = dataclasses.replace(Config(), tracing=TracingConfig(
        otlp_endpoint="http://alice:hunter2@c:4318", headers=(f"authorization=Bearer {SECRET}",)))
    shown = config_to_dict(cfg)["tracing"]
    assert shown["headers"] == ["authorization=***"] and shown["otlp_endpoint"] == "http://***@c:4318"
    assert config_to_dict(cfg, redact=False)["tracing"]["otlp_endpoint"] == "http://alice:hunter2@c:4318"
