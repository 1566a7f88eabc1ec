"""Serving the gateway app on Hypercorn's trio worker.

``serve_gateway`` follows the house pattern: ``await nursery.start(...)``
returns the address actually bound (port 0 becomes a real port), and
cancelling it shuts down gracefully: the listener closes at once, in-flight
answers (long generations included) get ``grace_period`` seconds to finish,
then they are cancelled, which closes their upstream streams.

TLS is Hypercorn's own (``tls=TlsFiles(...)``, from ``gateway.tls_cert``/
``tls_key``), with client certificates required when ``tls_client_ca`` is
set (mutual TLS: a client without a certificate from that CA never gets to
send a request). mTLS authenticates the machine, not the caller: API keys
or JWTs, when configured, are still required on top.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..errors import ConfigError, PortInUseError

log = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 10.0  # seconds in-flight answers get on shutdown
_SLACK = 2.0  # on top of the grace period, for Hypercorn's own lifespan shutdown


_h11_patched = False


def patch_h11_head_with_body() -> None:
    """Send a response's head in the same socket write as its first body bytes (idempotent).

    Hypercorn writes the status line and headers on ``http.response.start``,
    then each body chunk, each with its own ``send()``, so a one-chunk answer
    cost two or three system calls and as many wake-ups of the client. The
    gateway starts a response only once it has its first body bytes (a
    failing upstream must stay retryable), so holding the head until the
    next event adds no delay. Empty writes (the end of a Content-Length
    body) are skipped. Measured with ``bench_gateway.py``: together with
    relaying Content-Length, about 1 ms off the remote path's p50.
    """
    global _h11_patched
    if _h11_patched:
        return
    import h11
    from hypercorn.events import RawData
    from hypercorn.protocol.h11 import H11Protocol

    async def send_h11_event(self, event) -> None:
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._meshollama_head = data
            return
        head = getattr(self, "_meshollama_head", b"")
        if head:
            self._meshollama_head = b""
            data = head + data
        if data:
            await self.send(RawData(data=data))

    H11Protocol._send_h11_event = send_h11_event
    _h11_patched = True


@dataclass(frozen=True)
class TlsFiles:
    """What the gateway serves TLS with: PEM files."""

    cert: Path  # certificate chain, leaf first
    key: Path
    client_ca: Path | None = None  # set: clients must present a certificate this CA signed


def tls_from_config(gateway: Any) -> TlsFiles | None:
    """``gateway.tls_cert``/``tls_key``/``tls_client_ca`` (validated together by the config)."""
    if gateway.tls_cert is None or gateway.tls_key is None:
        return None
    return TlsFiles(Path(gateway.tls_cert), Path(gateway.tls_key),
                    None if gateway.tls_client_ca is None else Path(gateway.tls_client_ca))


def check_tls(tls: TlsFiles) -> None:
    """Load the files once before serving, so a bad one is a :class:`ConfigError` naming
    its key, not a bind failure from deep inside Hypercorn."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError("gateway.tls_cert", f"cannot use {tls.cert} with key {tls.key}: {exc}") from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ValueError) as exc:
            raise ConfigError("gateway.tls_client_ca", f"cannot load {tls.client_ca}: {exc}") from exc


def hypercorn_config(listen: str, grace_period: float = DEFAULT_GRACE_PERIOD,
                     tls: TlsFiles | None = None) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None  # per-request lines are the metrics' job
    config.errorlog = logging.getLogger("meshollama.gateway.hypercorn")
    config.graceful_timeout = grace_period
    config.include_server_header = False
    # Ollama has no read or write timeouts (spec §1.1): streams may run for minutes.
    config.read_timeout = None
    if tls is not None:
        config.certfile = str(tls.cert)
        config.keyfile = str(tls.key)
        # HTTP/1.1 only: the streaming, the head-with-body write and the
        # graceful shutdown are built and tested on Hypercorn's h11 protocol.
        config.alpn_protocols = ["http/1.1"]
        if tls.client_ca is not None:
            config.ca_certs = str(tls.client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    return config


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host, port


def _find_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_oserror(inner)
            if found is not None:
                return found
    return None


def _bound(binds: list[str]) -> str:
    """``http://127.0.0.1:43210`` -> ``127.0.0.1:43210``."""
    first = binds[0]
    return first.split("://", 1)[1] if "://" in first else first


async def serve_gateway(
    app: Any,
    listen: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    grace_period: float = DEFAULT_GRACE_PERIOD,
    tls: TlsFiles | None = None,
) -> None:
    """Serve ``app`` on ``listen`` ("HOST:PORT") until cancelled, over TLS if ``tls``.

    ``task_status.started("host:port")`` reports the address bound (the
    scheme is ``https`` exactly when ``tls`` is given). Raises
    :class:`PortInUseError` if the port is taken, :class:`ConfigError` for
    an unusable TLS file or any other reason the address cannot be bound.
    """
    host, _ = _split(listen)
    if tls is not None:
        check_tls(tls)
    state = getattr(app, "extensions", {}).get("meshollama")
    auth = getattr(state, "auth", None)
    if not _is_loopback(host):
        if auth is None or not auth.configured:
            log.warning(
                "the API on %s is reachable from other machines and has no API keys: anyone who can "
                "reach it can use every model in the mesh (create one with `meshollama keys create`)",
                listen,
            )
        elif tls is None:
            log.warning("the API on %s takes API keys over plain HTTP: anyone on the path can read them "
                        "(set gateway.tls_cert and gateway.tls_key)", listen)
    try:
        await _serve(app, listen, task_status, grace_period, tls)
    except BaseExceptionGroup as group:
        # A bind failure is one error from deep inside nested nurseries:
        # callers get it bare, like any other start-up error.
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], (PortInUseError, ConfigError)):
            raise group.exceptions[0] from None
        raise


async def _serve(app: Any, listen: str, task_status: trio.TaskStatus[str], grace_period: float,
                 tls: TlsFiles | None) -> None:
    config = hypercorn_config(listen, grace_period, tls)
    patch_h11_head_with_body()
    shutdown = trio.Event()
    # Shielded, so that cancelling us triggers a graceful shutdown instead
    # of killing in-flight answers at once; its deadline is the backstop.
    server_scope = trio.CancelScope(shield=True)
    serving = False

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            try:
                await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
            except BaseException as exc:
                err = None if serving else _find_oserror(exc)
                if err is None:
                    raise
                if err.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"cannot listen on {listen}: address already in use (change it with --api-listen)"
                    ) from exc
                raise ConfigError("gateway.listen", f"cannot listen on {listen}: {err.strerror or err}") from exc

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(run)
        serving = True
        bound = _bound(binds)
        log.info("Ollama-compatible API listening on %s://%s", "https" if tls else "http", bound)
        task_status.started(bound)
        try:
            await trio.sleep_forever()
        finally:
            shutdown.set()
            closing = getattr(getattr(app, "extensions", {}).get("meshollama"), "closing", None)
            if closing is not None:  # endless answers (the panel's event stream) end now, not at the deadline
                closing.set()
            server_scope.deadline = trio.current_time() + grace_period + _SLACK
