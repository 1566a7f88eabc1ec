"""Client libraries used as their users use them, against a real node serving SmolLM2.

Each test makes the library's common call with the node as its server and
checks what the library hands back: its own parsing of the answer is part of
the test (a field it needs, missing or of the wrong type, fails here even
when the replay of the same request looks fine). The expectations are what
the same call against real Ollama gives: tools accepted by a model that has a
chat template for them, logprobs when asked, the Responses and Anthropic
Messages APIs served.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .conftest import MODEL, REQUEST_TIMEOUT, needs_model

pytestmark = [pytest.mark.slow, pytest.mark.embedded, needs_model]

T = REQUEST_TIMEOUT


def _recorder():
    """``scripts/clients/record.py``, which asked the same questions of real Ollama when
    the recordings were made: one copy of the prompts and the tool (stdlib imports only)."""
    spec = importlib.util.spec_from_file_location(
        "meshollama_client_recorder", Path(__file__).resolve().parents[2] / "scripts" / "clients" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rec = _recorder()
N = _rec.N  # tokens to generate
QUESTION = _rec.QUESTION
TOOL_QUESTION = _rec.TOOL_QUESTION
get_current_weather = _rec.get_current_weather
WEATHER_TOOL = _rec.WEATHER_TOOL
DIM = 576  # SmolLM2-135M's hidden size
# A fixed seed wherever the API takes one: SmolLM2 sometimes ends its turn at
# its first token, and an empty answer would say nothing about the node. The
# Responses and Anthropic APIs take no seed: there an empty answer passes only
# when the answer itself says the model stopped after at most one token.
SEED = 7
OPTS = {"num_predict": N, "seed": SEED}


# --- ollama ---------------------------------------------------------------------


@pytest.fixture
def ollama_client(node):
    import ollama

    return ollama.Client(host=node, timeout=T)


def test_ollama_chat(ollama_client):
    r = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=OPTS)
    assert r.done and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and r.message.content.strip()
    assert r.eval_count and r.eval_count > 0


def test_ollama_chat_stream(ollama_client):
    parts = list(ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True,
                                    options=OPTS))
    assert "".join(p.message.content or "" for p in parts).strip()
    assert parts[-1].done and all(not p.done for p in parts[:-1])


def test_ollama_show_lists_tools(ollama_client):
    # Ollama lists "tools" for a model whose chat template handles them, and
    # clients (litellm, Open WebUI) read /api/show to decide to send tools.
    assert "tools" in (ollama_client.show(MODEL).capabilities or [])


def test_ollama_chat_with_tools(ollama_client):
    r = ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": TOOL_QUESTION}],
                           tools=[get_current_weather], options=OPTS)
    assert r.done and r.message.role == "assistant"
    assert r.message.content or r.message.tool_calls
    for call in r.message.tool_calls or []:
        assert call.function.name == "get_current_weather" and isinstance(call.function.arguments, dict)


def test_ollama_chat_with_tools_stream(ollama_client):
    parts = list(ollama_client.chat(model=MODEL, messages=[{"role": "user", "content": TOOL_QUESTION}],
                                    tools=[WEATHER_TOOL], stream=True, options=OPTS))
    assert parts[-1].done
    assert "".join(p.message.content or "" for p in parts) or any(p.message.tool_calls for p in parts)


def test_ollama_chat_with_a_tool_result(ollama_client):
    messages = [
        {"role": "user", "content": TOOL_QUESTION},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_current_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": get_current_weather("Paris"), "tool_name": "get_current_weather"},
    ]
    r = ollama_client.chat(model=MODEL, messages=messages, tools=[get_current_weather], options=OPTS)
    assert r.done and (r.message.content or r.message.tool_calls)


def test_ollama_generate_and_embed(ollama_client):
    g = ollama_client.generate(model=MODEL, prompt=QUESTION, options=OPTS)
    assert g.done and g.response.strip()
    e = ollama_client.embed(model=MODEL, input=["The sky is blue.", "Grass is green."])
    assert len(e.embeddings) == 2 and all(len(v) == DIM for v in e.embeddings)
    assert MODEL in {m.model for m in ollama_client.list().models}


# --- openai ---------------------------------------------------------------------


@pytest.fixture
def openai_client(node):
    import openai

    return openai.OpenAI(base_url=node + "/v1", api_key="ollama", timeout=T, max_retries=0)


def test_openai_chat(openai_client):
    r = openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=N, seed=SEED)
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0


def test_openai_chat_stream(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=N, stream=True, seed=SEED,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0


def test_openai_chat_with_tools(openai_client):
    r = openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TOOL_QUESTION}],
                                              tools=[WEATHER_TOOL], max_tokens=N, seed=SEED)
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls
    for call in msg.tool_calls or []:
        assert call.function.name == "get_current_weather"
        json.loads(call.function.arguments)
    if msg.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"


def test_openai_chat_logprobs(openai_client):
    r = openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=N, logprobs=True, top_logprobs=2, seed=SEED)
    content = r.choices[0].logprobs and r.choices[0].logprobs.content
    assert content, f"no logprobs in {r.choices[0]}"
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2


def test_openai_chat_logprobs_stream(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=N, logprobs=True,
        top_logprobs=2, stream=True, seed=SEED))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert tokens, "no logprobs in the stream"
    assert all(len(t.top_logprobs) == 2 for t in tokens)


def test_openai_embeddings(openai_client):
    r = openai_client.embeddings.create(model=MODEL, input=["The sky is blue.", "Grass is green."])
    assert len(r.data) == 2 and all(len(d.embedding) == DIM for d in r.data)


def test_openai_responses(openai_client):
    r = openai_client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=N)
    assert r.status in ("completed", "incomplete")
    assert r.output_text.strip() or (r.status == "completed" and r.usage.output_tokens <= 1), r


def test_openai_responses_stream(openai_client):
    events = list(openai_client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=N, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete"), types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text
    assert text.strip() or (final.status == "completed" and final.usage.output_tokens <= 1), final


def test_openai_responses_with_tools(openai_client):
    r = openai_client.responses.create(model=MODEL, input=TOOL_QUESTION, max_output_tokens=N, tools=[{
        "type": "function", "name": "get_current_weather", "description": "Get the current weather for a city",
        "parameters": WEATHER_TOOL["function"]["parameters"]}])
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.output_text or calls or (r.status == "completed" and r.usage.output_tokens <= 1), r
    for call in calls:
        assert call.name == "get_current_weather"
        json.loads(call.arguments)


# --- anthropic --------------------------------------------------------------------


@pytest.fixture
def anthropic_client(node):
    import anthropic

    return anthropic.Anthropic(base_url=node, api_key="ollama", timeout=T, max_retries=0)


def test_anthropic_messages(anthropic_client):
    m = anthropic_client.messages.create(model=MODEL, max_tokens=N, messages=[{"role": "user", "content": QUESTION}])
    assert m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
    if m.stop_reason == "end_turn" and m.usage.output_tokens <= 1:
        return  # the model ended its turn at once: nothing more to check
    assert m.content and m.content[0].type == "text" and m.content[0].text.strip(), m


def test_anthropic_messages_stream(anthropic_client):
    with anthropic_client.messages.stream(model=MODEL, max_tokens=N, system="You are a terse assistant.",
                                          messages=[{"role": "user", "content": QUESTION}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    if not text.strip():
        assert final.stop_reason == "end_turn" and final.usage.output_tokens <= 1, final
        return
    assert final.content[0].text == text


def test_anthropic_messages_with_tools(anthropic_client):
    m = anthropic_client.messages.create(
        model=MODEL, max_tokens=N, messages=[{"role": "user", "content": TOOL_QUESTION}],
        tools=[{"name": "get_current_weather", "description": "Get the current weather for a city",
                "input_schema": WEATHER_TOOL["function"]["parameters"]}])
    assert m.content or (m.stop_reason == "end_turn" and m.usage.output_tokens <= 1), m
    for block in m.content:
        assert block.type in ("text", "tool_use")
        if block.type == "tool_use":
            assert block.name == "get_current_weather" and isinstance(block.input, dict)


# --- langchain-ollama ------------------------------------------------------------


def test_langchain_ollama_llm(node):
    from langchain_ollama import OllamaLLM

    llm = OllamaLLM(model=MODEL, base_url=node, num_predict=N, seed=SEED, client_kwargs={"timeout": T})
    assert llm.invoke("hi").strip()


def test_langchain_chat_ollama(node):
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model=MODEL, base_url=node, num_predict=N, seed=SEED, client_kwargs={"timeout": T})
    assert chat.invoke(QUESTION).content.strip()


def test_langchain_chat_ollama_bind_tools(node):
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather for a city."""
        return get_current_weather(city)

    chat = ChatOllama(model=MODEL, base_url=node, num_predict=N, seed=SEED, client_kwargs={"timeout": T})
    msg = chat.bind_tools([get_weather]).invoke(TOOL_QUESTION)
    assert msg.content or msg.tool_calls
    for call in msg.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"], dict)


def test_langchain_ollama_embeddings(node):
    from langchain_ollama import OllamaEmbeddings

    emb = OllamaEmbeddings(model=MODEL, base_url=node, client_kwargs={"timeout": T})
    assert len(emb.embed_query("The sky is blue.")) == DIM
    assert [len(v) for v in emb.embed_documents(["a", "b"])] == [DIM, DIM]


# --- litellm ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["ollama", "ollama_chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["once", "stream"])
def test_litellm_completion(node, prefix, stream):
    import litellm

    r = litellm.completion(model=f"{prefix}/{MODEL}", api_base=node, max_tokens=N, stream=stream, timeout=T, seed=SEED,
                           messages=[{"role": "user", "content": QUESTION}])
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in r)
    else:
        text = r.choices[0].message.content
    assert text and text.strip()


def test_litellm_completion_with_tools(node):
    import litellm

    r = litellm.completion(model=f"ollama_chat/{MODEL}", api_base=node, max_tokens=N, timeout=T, seed=SEED,
                           tools=[WEATHER_TOOL], messages=[{"role": "user", "content": TOOL_QUESTION}])
    msg = r.choices[0].message
    assert msg.content or msg.tool_calls
    for call in msg.tool_calls or []:
        assert call.function.name == "get_current_weather"
        json.loads(call.function.arguments)


# --- llama-index -------------------------------------------------------------------


@pytest.fixture
def llama_index_llm(node):
    from llama_index.llms.ollama import Ollama

    return Ollama(model=MODEL, base_url=node, request_timeout=float(T), additional_kwargs=OPTS)


def test_llama_index_complete(llama_index_llm):
    assert llama_index_llm.complete(QUESTION).text.strip()


def test_llama_index_chat_and_stream_chat(llama_index_llm):
    from llama_index.core.llms import ChatMessage

    messages = [ChatMessage(role="system", content="You are a terse assistant."),
                ChatMessage(role="user", content=QUESTION)]
    assert llama_index_llm.chat(messages).message.content.strip()
    parts = list(llama_index_llm.stream_chat(messages))
    assert "".join(p.delta or "" for p in parts).strip()
    assert parts[-1].message.content.strip()
