"""The node's side of ``meshollama run``: the gateway's chat API, and what its answers may be.

``cli_run`` is the terminal; this module speaks HTTP to the gateway and
checks every answer line before the terminal sees it (an answer comes from
whichever peer holds the model: it is not trusted).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Any


class RunError(Exception):
    """An error to print as ``Error: ...`` (Ollama's wording) and exit 1."""


INVALID_LINE = "the node sent an invalid answer line"
ENDED_EARLY = "the answer ended early"

def parse_line(line: str | bytes) -> dict[str, Any]:
    """One line of the streamed answer, checked for the shape :meth:`Session.turn` reads:
    a JSON object; ``message`` absent, null or an object whose ``content`` is absent,
    null or a string. Anything else (or JSON nested too deep to parse) is a RunError."""
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):
        raise RunError(INVALID_LINE) from None
    if not isinstance(event, dict):
        raise RunError(INVALID_LINE)
    message = event.get("message")
    if message is not None and not (isinstance(message, dict)
                                    and isinstance(message.get("content"), (str, type(None)))):
        raise RunError(INVALID_LINE)
    return event


def _number(value: Any) -> float:
    """A timing or count of the final line (absent: 0); not a number: the line is invalid."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(INVALID_LINE)
    return value


def explain(status: int, body: str, model: str) -> str:
    """One readable line for an error answer of the gateway (Ollama's ``{"error": ...}``)."""
    try:
        data = json.loads(body)
        message = data.get("error") if isinstance(data, dict) else None
        if isinstance(message, dict):  # OpenAI-shaped
            message = message.get("message")
    except ValueError:
        message = None
    message = str(message or body.strip() or f"HTTP {status}")
    if status == 404 and "not found" in message:
        return f"{message}; no node of the mesh has it. Pull it with: meshollama pull {model}"
    if status in (401, 403):
        return f"{message} (set MESHOLLAMA_API_KEY or --api-key)"
    return message


class Gateway:
    """``POST /api/chat`` (streamed) and ``POST /api/show`` on the node's gateway."""

    def __init__(self, url: str, model: str, headers: dict[str, str], verify: Any) -> None:
        self.url, self.model, self.headers, self.verify = url, model, headers, verify
        # HTTP(S)_PROXY, ALL_PROXY: not for this machine's own node. A proxy cannot reach
        # the caller's loopback (a dead or remote proxy would turn every run into an error),
        # and Ollama's Go client skips the proxy for loopback hosts too. A node on another
        # machine (--host) may need the proxy the environment names, so it keeps them.
        self.trust_env = not is_loopback_url(url)

    def _unreachable(self, exc: Exception) -> RunError:
        return RunError(f"cannot reach the node at {self.url}: {exc} (is `meshollama start` running?)")

    def check_model(self) -> None:
        """Fail early, as `ollama run` does, when no node of the mesh has the model."""
        import httpx

        try:
            resp = httpx.post(self.url + "/api/show", json={"model": self.model}, headers=self.headers,
                              timeout=30.0, verify=self.verify, trust_env=self.trust_env)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code != 200:
            raise RunError(explain(resp.status_code, resp.text, self.model))

    def chat(self, messages: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        import httpx

        body = {"model": self.model, "messages": messages, "stream": True}
        try:
            # The stream is closed on any exit, Ctrl-C included: the gateway then cancels the generation.
            with httpx.stream("POST", self.url + "/api/chat", json=body, headers=self.headers,
                              timeout=httpx.Timeout(30.0, read=None), verify=self.verify,
                              trust_env=self.trust_env) as resp:
                if resp.status_code != 200:
                    raise RunError(explain(resp.status_code, resp.read().decode(errors="replace"), self.model))
                peer = resp.headers.get("x-meshollama-peer")
                for line in resp.iter_lines():
                    if line.strip():
                        event = parse_line(line)
                        if event.get("done") and peer:
                            event["_peer"] = peer
                        yield event
        except httpx.HTTPError as exc:
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                raise self._unreachable(exc) from None
            raise RunError(f"the answer broke off: {exc}") from None


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine: localhost, a loopback or an unspecified address."""
    from urllib.parse import urlsplit

    try:
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified
