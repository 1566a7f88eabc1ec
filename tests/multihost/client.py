"""A real HTTP client run inside a namespace host: ``python -m tests.multihost.client``.

    client METHOD URL [BODY]

Prints one JSON object: status, headers, and the body as a list of lines
(each NDJSON or SSE line as it came), or the error. Used because a gateway
listens on 127.0.0.1 inside its host, as on a real machine.
"""

from __future__ import annotations

import json
import sys

import httpx


def main() -> int:
    method, url = sys.argv[1], sys.argv[2]
    body = sys.argv[3].encode() if len(sys.argv) > 3 else None
    out: dict = {}
    try:
        with httpx.Client(timeout=60.0) as client:
            with client.stream(method, url, content=body) as r:
                out["status"] = r.status_code
                out["headers"] = dict(r.headers)
                out["lines"] = [line for line in r.iter_lines() if line]
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
