"""``/v1/responses`` and ``/v1/messages`` on a backend that speaks chat completions.

Ollama serves both APIs by converting each request to a chat request and the
answer back (``middleware/openai.go``, ``middleware/anthropic.go``); the
embedded backend does the same: :func:`translated` turns the request into a
``/v1/chat/completions`` one (:mod:`.responses_api`, :mod:`.messages_api`),
runs it through the backend's own chat path, and converts the answer, SSE
chunk by SSE chunk when streamed. Errors come back in the API's own envelope,
before the first byte with their status, after it as the API's error event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from ..errors import BadRequest, RequestError
from ..httpmsg import ProxyRequest, ProxyResponse, error_text
from . import messages_api, responses_api
from .ollama_api import JSON, SSE, Endpoint, Reply, dumps
from .ollama_requests import decode_body
from .token_stream import reply_response

OpenChat = Callable[[ProxyRequest], AbstractAsyncContextManager[ProxyResponse]]
ERROR_LIMIT = 64 * 1024


@asynccontextmanager
async def translated(ep: Endpoint, request: ProxyRequest, open_chat: OpenChat) -> AsyncIterator[ProxyResponse]:
    """The answer to a Responses or Messages request, computed as a chat completion."""
    anthropic = ep is Endpoint.V1_MESSAGES
    api: Any = messages_api if anthropic else responses_api
    try:
        original = decode_body(request.body, "MessagesRequest" if anthropic else "ResponsesRequest", openai=True)
        chat = api.to_chat(request.body)
    except RequestError as e:
        yield reply_response(api.error_reply(e))
        return
    except Exception as e:  # a body shape the converter did not foresee: the client's 400, not a peer failure
        yield reply_response(api.error_reply(BadRequest(f"invalid request: {type(e).__name__}: {e}")))
        return
    headers = tuple((k, v) for k, v in request.headers if k.lower() not in ("content-length", "content-type"))
    chat_request = ProxyRequest("POST", "/v1/chat/completions", headers + (("content-type", JSON),), dumps(chat))
    async with open_chat(chat_request) as resp:
        if resp.status != 200:
            body = await _read(resp, ERROR_LIMIT)
            yield reply_response(api.error_reply(RequestError(error_text(body), resp.status)))
            return
        model = str(chat.get("model") or "")
        if not chat.get("stream"):
            completion = json.loads(await _read(resp, None))
            if anthropic:
                obj = messages_api.from_chat(completion, model=model)
            else:
                obj = responses_api.from_chat(completion, request=original)
            yield reply_response(Reply(200, JSON, dumps(obj)))
            return
        if anthropic:
            stream: Any = messages_api.MessagesStream(model, input_tokens=messages_api.estimate_input_tokens(original))
        else:
            stream = responses_api.ResponsesStream(model, int(time.time()), request=original)
        yield ProxyResponse(200, (("content-type", SSE),), _events(resp.body, stream))


async def _events(chunks: AsyncIterator[bytes], stream: Any) -> AsyncIterator[bytes]:
    """Chat SSE in, the API's SSE out; an error event or a cut stream ends it with the API's error."""
    buf = b""
    finished = False
    try:
        async for chunk in chunks:
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = b"".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
                if not data:
                    continue
                if data == b"[DONE]":
                    finished = True
                    out = stream.finish()
                else:
                    obj = json.loads(data)
                    if isinstance(obj, dict) and "error" in obj:
                        finished = True
                        out = stream.fail(error_text(data))
                    else:
                        out = stream.feed(obj)
                if out:
                    yield out
    except (RequestError, ValueError) as e:
        finished = True
        yield stream.fail(f"generation failed: {e}")
    if not finished:
        yield stream.fail("generation ended before it finished")


async def _read(resp: ProxyResponse, limit: int | None) -> bytes:
    parts, size = [], 0
    async for chunk in resp.body:
        parts.append(chunk)
        size += len(chunk)
        if limit is not None and size > limit:
            break
    return b"".join(parts)
