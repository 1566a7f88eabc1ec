"""The image's HEALTHCHECK: exit 0 when this container's node answers ``GET /healthz``.

``--ready`` asks ``/readyz`` instead (mesh joined, backend answering). Standard
library only, so a check costs a few milliseconds of CPU. The port comes from
``MESHOLLAMA_GATEWAY_LISTEN`` as the node reads it (``--api-listen`` on the
command line is not visible here: keep the two on the same port); with
``MESHOLLAMA_GATEWAY_TLS_CERT`` set it speaks HTTPS to itself without verifying
(it is its own loopback). ``HTTP(S)_PROXY`` in the container's environment
(set for the node's own downloads, say) is not used: a proxy cannot reach this
container's loopback, and a check through it would fail a healthy node.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def url(env: dict[str, str], path: str) -> str:
    listen = env.get("MESHOLLAMA_GATEWAY_LISTEN") or "127.0.0.1:11434"
    port = listen.rsplit(":", 1)[1]
    scheme = "https" if env.get("MESHOLLAMA_GATEWAY_TLS_CERT") else "http"
    return f"{scheme}://127.0.0.1:{port}{path}"


def main(argv: list[str]) -> int:
    path = "/readyz" if "--ready" in argv else "/healthz"
    target = url(dict(os.environ), path)
    context = ssl._create_unverified_context() if target.startswith("https") else None
    # No ProxyHandler from the environment: an empty one means "no proxy, ever".
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(target, timeout=4) as resp:
            return 0 if resp.status == 200 else 1
    except (OSError, urllib.error.URLError) as exc:
        print(f"{target}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
