"""Blob uploads (what ``ollama create`` sends) stream through the gateway to the
local backend: bigger than ``gateway.max_body_bytes``, never held whole in memory."""

from __future__ import annotations

import hashlib

import httpx
import trio

from .fakes import FakeMesh, running_gateway
from .test_conformance_checks import stand_in

LIMIT = 64 * 1024


async def test_a_blob_larger_than_the_body_limit_reaches_ollama_intact():
    data = bytes(range(256)) * 4096  # 1 MiB, 16x the limit
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    sent = []

    async def chunks():
        for i in range(0, len(data), 65536):
            sent.append(i)
            yield data[i:i + 65536]

    with trio.fail_after(20):
        async with stand_in(max_body_bytes=LIMIT) as env:
            r = await env.client.post("/api/blobs/" + digest, content=chunks())  # chunked, no length
            assert r.status_code == 201, r.text
            assert digest.removeprefix("sha256:") in env.fake.blobs  # the stand-in verified the sha256
            r = await env.client.post("/api/blobs/" + digest, content=data)  # with Content-Length
            assert r.status_code == 200
            # other bodies keep the limit
            r = await env.client.post("/api/generate", content=b'{"model":"x","prompt":"' + b"a" * LIMIT + b'"}')
            assert r.status_code == 413


async def test_a_wrong_digest_is_ollamas_400_and_the_gateway_keeps_serving():
    with trio.fail_after(20):
        async with stand_in(max_body_bytes=LIMIT) as env:
            r = await env.client.post("/api/blobs/sha256:" + "0" * 64, content=b"x" * (3 * LIMIT))
            assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
            assert (await env.client.get("/api/version")).status_code == 200


async def test_a_client_leaving_mid_upload_costs_nothing():
    data = b"y" * (4 * LIMIT)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with trio.fail_after(20):
        async with stand_in(max_body_bytes=LIMIT) as env:
            async def half_then_leave():
                yield data[: LIMIT]
                raise RuntimeError("client gives up")

            try:
                await env.client.post("/api/blobs/" + digest, content=half_then_leave())
            except (RuntimeError, httpx.HTTPError):
                pass
            assert digest.removeprefix("sha256:") not in env.fake.blobs
            r = await env.client.post("/api/blobs/" + digest, content=data)  # and a whole one still works
            assert r.status_code == 201


async def test_no_local_backend_answers_an_upload_with_an_error():
    with trio.fail_after(10):
        async with running_gateway(FakeMesh(), None, max_body_bytes=LIMIT) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/blobs/sha256:" + "0" * 64, content=b"z" * (2 * LIMIT))
            assert r.status_code >= 400 and "error" in r.json()


async def test_an_upload_the_backend_does_not_read_is_answered_and_the_connection_closed():
    """A backend that refuses a blob without reading it (the embedded one does):
    its answer reaches the client with Connection: close, since the rest of the
    body was never read, and the gateway goes on serving."""
    from contextlib import asynccontextmanager

    from meshollama.httpmsg import ProxyResponse

    class Refuses:
        @asynccontextmanager
        async def open(self, request):
            async def body():
                yield b'{"error":"blobs are not supported here"}'

            yield ProxyResponse(501, (("content-type", "application/json"),), body())

    with trio.fail_after(10):
        async with running_gateway(FakeMesh(), Refuses(), max_body_bytes=LIMIT) as gw, \
                httpx.AsyncClient(base_url=gw.url) as client:
            r = await client.post("/api/blobs/sha256:" + "0" * 64, content=b"z" * (4 * LIMIT))
            assert r.status_code == 501 and r.json() == {"error": "blobs are not supported here"}
            assert r.headers["connection"] == "close"
            assert (await client.get("/api/version")).status_code == 200
