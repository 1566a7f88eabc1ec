"""Our Hypercorn wrapper: the response head goes out with the first body bytes."""

from __future__ import annotations

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

from meshollama.gateway.server import patch_h11_head_with_body

from .fakes import FakeMesh, running_gateway


def protocol(sent: list[bytes]) -> H11Protocol:
    async def send(event) -> None:
        if isinstance(event, RawData):
            sent.append(event.data)

    proto = H11Protocol.__new__(H11Protocol)  # only what _send_h11_event touches
    proto.connection = h11.Connection(h11.SERVER)
    proto.connection.receive_data(b"POST /api/generate HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    proto.connection.next_event()
    proto.connection.next_event()
    proto.send = send
    proto.config = Config()
    return proto


async def test_head_body_and_end_of_a_short_answer_are_one_write():
    patch_h11_head_with_body()
    sent: list[bytes] = []
    proto = protocol(sent)
    await proto._send_h11_event(h11.Response(status_code=200, headers=[("content-length", "2")]))
    assert sent == []  # held back
    await proto._send_h11_event(h11.Data(data=b"{}"))
    await proto._send_h11_event(h11.EndOfMessage())
    assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 200") and sent[0].endswith(b"\r\n\r\n{}")


async def test_a_head_without_body_is_flushed_by_the_end_of_message():
    patch_h11_head_with_body()
    sent: list[bytes] = []
    proto = protocol(sent)
    await proto._send_h11_event(h11.Response(status_code=204, headers=[]))
    await proto._send_h11_event(h11.EndOfMessage())
    assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 204")


async def test_served_answers_are_unchanged_on_the_wire():
    """Through the real server: keep-alive requests still get whole, correct answers."""
    import httpx

    with trio.fail_after(10):
        async with running_gateway(FakeMesh()) as gw, httpx.AsyncClient(base_url=gw.url) as client:
            for _ in range(3):
                r = await client.get("/api/version")
                assert r.status_code == 200 and "version" in r.json()
            r = await client.head("/")
            assert r.status_code == 200 and r.content == b""


async def test_ollamas_content_length_reaches_the_client_for_a_non_streamed_answer():
    """Through the real OllamaBackend: framed as Ollama framed it; streams stay chunked."""
    from .test_conformance_checks import CHAT, stand_in

    with trio.fail_after(10):
        async with stand_in() as env:
            r = await env.client.post("/api/generate", json={"model": CHAT, "prompt": "hi", "stream": False})
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(r.content)) and "transfer-encoding" not in r.headers
            async with env.client.stream("POST", "/api/generate", json={"model": CHAT, "prompt": "hi"}) as s:
                assert s.headers.get("transfer-encoding") == "chunked" and "content-length" not in s.headers
