"""A client that stops reading must not keep a node alive after SIGTERM.

Hypercorn shields its socket writes from cancellation, so a write blocked on a
full socket (the client sent requests and never reads the answers) survives
the gateway's grace period; the node process exits anyway, within
``node.HARD_EXIT_AFTER`` of the signal (found by the panel's review: an event
stream whose reader froze hung the shutdown)."""

from __future__ import annotations

import signal
import socket
from urllib.parse import urlsplit

import pytest
import trio

from meshollama.node import HARD_EXIT_AFTER

from .cluster import cluster

pytestmark = pytest.mark.slow


async def test_a_client_that_never_reads_does_not_hold_the_shutdown(tmp_path):
    with trio.fail_after(HARD_EXIT_AFTER + 40):
        async with cluster(tmp_path) as c:
            node = await c.start("a", "--backend", "none")
            url = urlsplit(node.api)
            sock = socket.socket()
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((url.hostname, url.port))
                # Pipelined scrapes, never read: the answers fill both socket buffers.
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n" * 3000)
                big = await c.client.get(f"{node.api}/metrics")  # the node still serves others meanwhile
                assert big.status_code == 200
                c.signal(node, signal.SIGTERM)
                # Bounded by the fail_after above: without the deadline it never exits.
                code = await c.wait_exit(node)
            finally:
                sock.close()
            assert code == 0, node.log()
