"""Backends: how a node serves its own models to the mesh and the gateway.

* ``base``: the :class:`Backend` interface (an Upstream that also reports its
  models and load), ``NoBackend`` and the change notifier.
* ``select``: choose and build the backend from ``backend.kind``.
* ``ollama``: forward requests to an Ollama server and announce its models.
* ``spawn``: run ``ollama serve`` as a managed child process.
* ``embedded``: GGUF models in-process with llama.cpp; the trio side (catalog,
  queueing and slots, the Upstream ``open()``). Imports without llama_cpp.
* ``llama_engine``: the thread side of ``embedded``: llama-cpp-python calls
  (load, tokenise, generate, embed), run in worker threads.
* ``token_stream``: generated text from the worker thread to the HTTP body,
  bounded (``TokenPipe``, collected or streamed).
* ``gguf``: GGUF file names, digests and metadata, without llama.cpp.

The embedded backend speaks the Ollama and OpenAI APIs itself, sans-IO:

* ``ollama_api``: endpoints and routing, content types, encoding, error replies.
* ``ollama_requests``: request bodies parsed and checked into frozen jobs.
* ``ollama_options``: option values (durations, ``keep_alive``, ``think``, sampling).
* ``shapers``: generated text as Ollama/OpenAI bytes (NDJSON, SSE).
* ``ollama_responses``: whole answers (embeddings, listings, pulls).
"""
