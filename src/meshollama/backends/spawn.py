"""Managed Ollama: run ``ollama serve`` as a child and keep it running.

With ``--spawn-ollama`` the node owns its Ollama: :class:`ManagedOllama`
starts ``ollama serve`` with ``OLLAMA_HOST`` set to the address the
:class:`~meshollama.backends.ollama.OllamaBackend` talks to, restarts it with
exponential backoff when it dies, and stops it when the node stops (SIGTERM,
then SIGKILL to its whole process group after a deadline, so model runners it
started do not outlive it). Readiness is not awaited here: the backend's poll
loop notices when Ollama starts answering and announces its models then.

The child runs in its own session, so a Ctrl-C in the terminal reaches only
meshollama, which then stops Ollama in order instead of both racing.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from ..errors import ConfigError

log = logging.getLogger("meshollama.backend.spawn")


@dataclass
class Backoff:
    """Restart delays: ``initial`` doubling up to ``maximum``, back to
    ``initial`` once a run lasted ``stable_after`` seconds. Pure: the caller
    passes each run's uptime."""

    initial: float = 0.5
    maximum: float = 30.0
    stable_after: float = 60.0
    _next: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._next = self.initial

    def after_exit(self, uptime: float) -> float:
        """The delay before the next start, given how long the last run lasted."""
        if uptime >= self.stable_after:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay


class ManagedOllama:
    """Runs ``<binary> serve`` until cancelled, restarting it when it exits.

    ``host_port`` becomes ``OLLAMA_HOST`` (``127.0.0.1:11435`` or a URL);
    ``num_parallel``, when given, becomes ``OLLAMA_NUM_PARALLEL`` so the
    capacity we announce is the one Ollama has. ``env`` is the child's base
    environment (default: ours); the binary is looked up on its ``PATH``.
    ``starts`` and ``delays`` (the restart delays used, in order) are there
    for status pages and tests.
    """

    def __init__(
        self,
        binary: str = "ollama",
        host_port: str = "127.0.0.1:11435",
        *,
        num_parallel: int | None = None,
        env: Mapping[str, str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.binary = binary
        self.host_port = host_port
        self.num_parallel = num_parallel
        self.stop_timeout = stop_timeout
        self._env = dict(os.environ if env is None else env)
        self._backoff = Backoff(backoff_initial, backoff_max, stable_after)
        self.starts = 0
        self.delays: list[float] = []
        self.process: trio.Process | None = None

    def resolve(self) -> str:
        """The binary's path; :class:`~meshollama.errors.ConfigError` if it is not on PATH."""
        path = shutil.which(self.binary, path=self._env.get("PATH", os.defpath))
        if path is None:
            raise ConfigError(
                "ollama.binary", f"{self.binary!r} not found on PATH; install Ollama or drop --spawn-ollama"
            )
        return path

    def child_env(self) -> dict[str, str]:
        env = dict(self._env)
        env["OLLAMA_HOST"] = self.host_port
        if self.num_parallel:
            env["OLLAMA_NUM_PARALLEL"] = str(self.num_parallel)
        return env

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start Ollama (ready once the first child is spawned) and keep it up until cancelled."""
        path = self.resolve()
        env = self.child_env()
        first = True
        while True:
            began = trio.current_time()
            try:
                proc = await trio.lowlevel.open_process(
                    [path, "serve"], env=env, stdin=subprocess.DEVNULL, start_new_session=True
                )
            except OSError as e:
                if first:
                    raise ConfigError("ollama.binary", f"cannot run {path!r}: {e}") from e
                log.error("cannot start %s serve: %s", path, e)
                returncode: int | None = None
            else:
                self.starts += 1
                self.process = proc
                log.info("started %s serve (pid %d) with OLLAMA_HOST=%s", path, proc.pid, self.host_port)
                if first:
                    task_status.started()
                    first = False
                try:
                    returncode = await proc.wait()
                finally:
                    if proc.returncode is None:  # we are being cancelled
                        with trio.CancelScope(shield=True):
                            await self._stop(proc)
                    self.process = None
            uptime = trio.current_time() - began
            delay = self._backoff.after_exit(uptime)
            self.delays.append(delay)
            log.warning(
                "ollama serve exited (%s) after %.1fs; restart %d in %.1fs",
                _exit_text(returncode),
                uptime,
                len(self.delays),
                delay,
            )
            await trio.sleep(delay)

    async def _stop(self, proc: trio.Process) -> None:
        proc.terminate()
        with trio.move_on_after(self.stop_timeout):
            await proc.wait()
        if proc.returncode is None:
            log.warning("ollama serve (pid %d) ignored SIGTERM for %gs; killing it", proc.pid, self.stop_timeout)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is Ollama and its runners
            except (ProcessLookupError, PermissionError, AttributeError):
                proc.kill()
            await proc.wait()
        log.info("stopped ollama serve (pid %d, %s)", proc.pid, _exit_text(proc.returncode))


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "did not start"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"
