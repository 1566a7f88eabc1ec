"""Replay, byte for byte, the requests real client libraries send, against a real node.

``recordings/<client>.json`` holds what each library sent to a recording
server (``scripts/clients/record.py``; Open WebUI's through
``scripts/clients/openwebui_e2e.py``). Each request is sent as it was, body
bytes and Content-Type/Accept/User-Agent unchanged, to the node that serves
SmolLM2 itself ("direct") and to a gateway-only node that reaches it over
the mesh ("mesh"), and its answer must be what Ollama would answer: status
200 and a well-formed answer for its API (``wellformed.py``).
"""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import REQUEST_TIMEOUT, needs_model, recordings
from .wellformed import Answer, check

pytestmark = [pytest.mark.slow, pytest.mark.embedded, needs_model]

RECORDED = recordings()


def replay(base: str, req: dict) -> Answer:
    headers = {k: v for k, v in (req.get("headers") or {}).items()}
    body = req["body"].encode("utf-8") if req["body"] is not None else None
    deadline = time.monotonic() + REQUEST_TIMEOUT
    with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=10)) as client:
        with client.stream(req["method"], base + req["path"], content=body, headers=headers) as r:
            data = b""
            for chunk in r.iter_raw():
                data += chunk
                assert time.monotonic() < deadline, f"no complete answer in {REQUEST_TIMEOUT}s"
            return Answer(r.status_code, r.headers.get("content-type", ""), data)


@pytest.mark.parametrize("via", ["direct", "mesh"])
@pytest.mark.parametrize("req", [r for _, r in RECORDED], ids=[i for i, _ in RECORDED])
def test_replay(mesh, via, req):
    answer = replay(mesh.urls[via], req)
    check(req["method"], req["path"], req["body"], answer)
