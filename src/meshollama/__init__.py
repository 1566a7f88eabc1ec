"""meshollama: pool many machines running language models into one Ollama endpoint.

Packages and modules:

* ``cli``, ``node``: the command line and the daemon that wires the parts.
* ``config``: layered, validated, frozen configuration.
* ``errors``: the one error tree; ``httpmsg``: request/response between
  gateway and upstreams; ``catalog``: models and load as announced.
* ``names``: Ollama model-name normalisation.
* ``routing``: the pure peer-choice function.
* ``wire``: sans-IO frame codec for HTTP over libp2p streams.
* ``mesh``: heartbeat codec, peer table, mesh service.
* ``p2p``: the only package that imports py-libp2p.
* ``gateway``: the Ollama/OpenAI HTTP API (Quart-trio on Hypercorn).
* ``backends``: local Ollama, managed Ollama, embedded llama.cpp.
"""

__version__ = "0.1.0"
