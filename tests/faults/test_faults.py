"""No request lost or hung: real ``meshollama start`` processes, faults injected underneath.

Node A is a gateway only (``--backend none``), so every request crosses the
mesh; holders B, C (D) serve one model from stand-in Ollamas that all say the
same numbered words, so a resumed answer is checked word for word. Every
request's fate is recorded: none may hang or end silently truncated, and
where another holder exists none may end in an error either.

Scenarios share a cluster where they can (process start-up costs seconds on
a small machine); each assertion names its scenario.
"""

from __future__ import annotations

import os
import signal
import sys

import httpx
import pytest
import trio

from .fates import Fate, Tally, continuous, discontinuity, numbered_text
from .mesh import PATHS, PEER, Mesh, mesh, payload, send_watching, signal_peer, write_config

pytestmark = pytest.mark.slow

TOKENS = 30
TEXT = numbered_text(TOKENS)
FAKE = {"text": TEXT, "tokens": TOKENS, "token_delay": 0.05}  # an answer takes about 1.5 s
BREAK_AFTER = 5  # lines of the answer the client has when the fault strikes
DEADLINE = 40.0  # a client's own deadline per request: past it, the request HUNG


def check_resumed(scenario: str, sent, m: Mesh, first: str, then: str) -> None:
    """A complete, continuous answer started on ``first`` and finished on ``then``."""
    o = sent.outcome
    where = f"{scenario}: {sent}\n{m.log()}"
    assert o.fate is Fate.COMPLETE, where
    assert continuous(o.text, TEXT), f"{scenario}: {discontinuity(o.text, TEXT)}; {sent}"
    assert sent.first_peer == first, where
    assert o.peers == (first, then), f"{scenario}: final object names {o.peers}, expected ({first}, {then})"


def other(m: Mesh, peer_id: str):
    return next(n for n in m.holders if n.peer_id != peer_id)


# --- 1, 2: the serving peer is killed or frozen mid-stream ------------------------


@pytest.mark.parametrize("fault", ["kill", "stop"])
async def test_a_peer_killed_or_frozen_mid_stream_is_resumed_on_another(tmp_path, fault):
    sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
    # A frozen peer is found by liveness pings; stall_timeout is only a backstop here.
    a_env = {"MESHOLLAMA_GATEWAY_STALL_TIMEOUT": "20"}
    tally = Tally()
    with trio.fail_after(150):
        async with mesh(tmp_path, 2, fake_kw=FAKE, a_env=a_env) as m:
            for path in PATHS:
                hook = signal_peer(m, sig)
                try:
                    sent = await send_watching(m.client, m.a.api, path, payload(path), deadline=DEADLINE,
                                               after_lines=BREAK_AFTER, on_lines=hook)
                finally:
                    for node in hook.hit:
                        if node.proc.poll() is None:
                            node.proc.send_signal(signal.SIGCONT)
                tally.add(sent.outcome)
                assert hook.hit, f"{fault} {path}: the answer never reached {BREAK_AFTER} lines: {sent}"
                victim = hook.hit[0]
                check_resumed(f"{fault} {path}", sent, m, victim.peer_id, other(m, victim.peer_id).peer_id)
                if fault == "kill":
                    await m.c.wait_exit(victim)
                    await m.c.restart(victim)
                with trio.fail_after(30):
                    await m.wait_routable()
    tally.assert_none_lost()
    assert tally.count(Fate.ERROR) == 0, tally.summary()


# --- 3, 4, 5: wedged and restarted backends -----------------------------------------

SOLO = "solo:latest"  # only on B: nobody else can take over
FIRST_BYTE = 2.0
STALL = 2.0


async def send_until_served_by(m: Mesh, fake, path: str, body: dict, tally: Tally, scenario: str, *,
                               tries: int = 6, **kw):
    """Send ``body`` until ``fake`` (one holder's Ollama) received one; every answer must complete."""

    def reached() -> int:  # the backend's own polls (/api/tags, /api/ps) do not count
        return sum(1 for r in fake.requests if r.path == path)

    seen = reached()
    for _ in range(tries):
        sent = await send_watching(m.client, m.a.api, path, body, deadline=DEADLINE, **kw)
        tally.add(sent.outcome)
        assert sent.fate is Fate.COMPLETE, f"{scenario}: {sent}\n{m.log()}"
        assert continuous(sent.outcome.text, TEXT), f"{scenario}: {discontinuity(sent.outcome.text, TEXT)}"
        if reached() > seen:
            return sent
    raise AssertionError(f"{scenario}: {tries} requests and none reached the faulty holder")


async def test_wedged_and_restarted_backends(tmp_path):
    a_env = {
        "MESHOLLAMA_GATEWAY_FIRST_BYTE_TIMEOUT": str(FIRST_BYTE),
        "MESHOLLAMA_GATEWAY_STALL_TIMEOUT": str(STALL),
        # A failed peer is normally tried last for a while; here every request
        # alternates, so the faulty holder is reached within two tries.
        "MESHOLLAMA_GATEWAY_SIDELINE_SECONDS": "0",
    }
    tally = Tally()
    with trio.fail_after(240):
        async with mesh(tmp_path, 2, fake_kw=FAKE, extra_models={0: [SOLO]}, a_args=("--routing", "round_robin"),
                        a_env=a_env) as m:
            (b, c), (sb, sc) = m.holders, m.slots
            fb, fc = sb.fake, sc.fake
            with trio.fail_after(30):
                await m.wait_routable([b], SOLO)
            solo = payload("/api/chat", SOLO)

            # 5. No other holder: a backend wedged before its first byte is given
            # up on after first_byte_timeout; the client is told, never left hanging.
            fb.set(hang_before_first_byte=True)
            sent = await send_watching(m.client, m.a.api, "/api/chat", solo, deadline=FIRST_BYTE * 3 + 15)
            tally.add(sent.outcome)
            assert sent.fate is Fate.ERROR, f"wedged, no other holder: {sent}\n{m.log()}"
            fb.clear_faults()
            with trio.fail_after(10):
                await fb.wait_for(lambda: fb.active == 0)

            # 5'. No other holder, wedged mid-stream: an explicit error after stall_timeout.
            fb.set(stall_after_n_chunks=BREAK_AFTER)
            sent = await send_watching(m.client, m.a.api, "/api/chat", solo, deadline=STALL * 3 + 15)
            tally.add(sent.outcome)
            assert sent.fate is Fate.ERROR, f"stalled, no other holder: {sent}\n{m.log()}"
            assert sent.outcome.text, f"stalled, no other holder: the client got no text before the error: {sent}"
            fb.clear_faults()
            with trio.fail_after(10):
                await fb.wait_for(lambda: fb.active == 0)

            # 3. Wedged before the first byte: the request goes to the other holder.
            fb.set(hang_before_first_byte=True)
            sent = await send_until_served_by(m, fb, "/api/chat", payload("/api/chat"), tally,
                                              "wedged before the first byte")
            assert sent.first_peer == c.peer_id, f"wedged before the first byte: {sent}"
            fb.clear_faults()
            with trio.fail_after(10):
                await fb.wait_for(lambda: fb.active == 0)

            # 3'. Wedged mid-stream: the stall is noticed, the answer resumed on the other holder.
            # (One path: how an answer resumes per path is the kill test's business.)
            path = "/v1/chat/completions"
            fc.set(stall_after_n_chunks=BREAK_AFTER)
            sent = await send_until_served_by(m, fc, path, payload(path), tally, f"stalled mid-stream {path}")
            fc.clear_faults()
            check_resumed(f"stalled mid-stream {path}", sent, m, c.peer_id, b.peer_id)
            with trio.fail_after(10):
                await fc.wait_for(lambda: fc.active == 0)

            # 4. The serving peer's Ollama goes away mid-stream: resumed on the other holder.
            stopped = []

            async def stop_backend(headers: httpx.Headers) -> None:
                node, slot = m.holder(headers[PEER])
                stopped.append((node, slot))
                await slot.stop()

            sent = await send_watching(m.client, m.a.api, "/api/chat", payload("/api/chat"), deadline=DEADLINE,
                                       after_lines=BREAK_AFTER, on_lines=stop_backend)
            tally.add(sent.outcome)
            assert stopped, f"backend restart: the answer never reached {BREAK_AFTER} lines: {sent}"
            down, slot = stopped[0]
            up = other(m, down.peer_id)
            check_resumed("backend stopped mid-stream", sent, m, down.peer_id, up.peer_id)

            # 4'. While it is down, requests complete on the other holder (short answers: 5 words).
            short = {**payload("/api/chat"), "options": {"num_predict": 5}}
            want = TEXT.split()[:5]
            for i in range(3):
                sent = await send_watching(m.client, m.a.api, "/api/chat", short, deadline=DEADLINE)
                tally.add(sent.outcome)
                assert sent.fate is Fate.COMPLETE, f"backend down, request {i}: {sent}\n{m.log()}"
                assert continuous(sent.outcome.text, want), f"backend down: {discontinuity(sent.outcome.text, want)}"
                assert sent.first_peer == up.peer_id, f"backend down, request {i}: {sent}"

            # 4''. A new Ollama on the same port: the holder serves again.
            await slot.start()
            with trio.fail_after(30):
                await m.wait_routable()
            with trio.fail_after(60):
                while True:
                    sent = await send_watching(m.client, m.a.api, "/api/chat", short, deadline=DEADLINE)
                    tally.add(sent.outcome)
                    assert sent.fate is Fate.COMPLETE, f"backend back: {sent}\n{m.log()}"
                    assert continuous(sent.outcome.text, want), f"backend back: {sent}"
                    if sent.first_peer == down.peer_id:
                        break
    tally.assert_none_lost()
    assert tally.count(Fate.ERROR) == 2, tally.summary()  # the two with no other holder, and only those


# --- 6: the per-model queue is full --------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after(tmp_path):
    queue_size = 2
    a_env = {"MESHOLLAMA_GATEWAY_QUEUE_SIZE": str(queue_size)}
    tally = Tally()
    results = []
    with trio.fail_after(90):
        async with mesh(tmp_path, 1, fake_kw={**FAKE, "token_delay": 0.04}, a_env=a_env) as m:
            fake = m.slots[0].fake

            async def one() -> None:
                sent = await send_watching(m.client, m.a.api, "/api/chat", payload("/api/chat"), deadline=DEADLINE)
                results.append(sent)
                tally.add(sent.outcome)

            async with trio.open_nursery() as n:
                for _ in range(6):
                    n.start_soon(one)
            ran = sum(1 for r in fake.requests if r.path == "/api/chat")
            assert ran == tally.count(Fate.COMPLETE), f"queue: {ran} answers ran on the holder; {tally.summary()}"
    tally.assert_none_lost()
    for sent in results:
        if sent.fate is Fate.COMPLETE:
            assert continuous(sent.outcome.text, TEXT), f"queue: {discontinuity(sent.outcome.text, TEXT)}"
        else:
            assert sent.outcome.status == 503, f"queue: {sent}"
            retry = sent.headers.get("retry-after") if sent.headers is not None else None
            assert retry is not None and retry.isdigit() and int(retry) >= 1, f"queue: Retry-After {retry!r}: {sent}"
    assert tally.count(Fate.COMPLETE) >= queue_size + 1, tally.summary()


async def test_a_request_queued_at_a_holders_own_gateway_is_served(tmp_path):
    """A holder's own gateway queues a second request for its local model (one
    slot) and dispatches it once the first answer ends: its own wait line must
    not count as load on its own backend."""
    holder_env = {"MESHOLLAMA_GATEWAY_QUEUE_TIMEOUT": "15"}  # a stuck line ends in a 503, not a hang
    tally = Tally()
    with trio.fail_after(90):
        async with mesh(tmp_path, 1, fake_kw=FAKE, holder_env=holder_env) as m:
            (b,) = m.holders
            started = trio.Event()

            async def first(headers: httpx.Headers) -> None:
                started.set()

            async def one(hook=None) -> None:
                if hook is None:
                    await started.wait()
                sent = await send_watching(m.client, b.api, "/api/chat", payload("/api/chat"), deadline=DEADLINE,
                                           after_lines=1 if hook else None, on_lines=hook)
                started.set()
                tally.add(sent.outcome)

            async with trio.open_nursery() as n:
                n.start_soon(one, first)
                n.start_soon(one)
    tally.assert_none_lost()
    assert tally.count(Fate.COMPLETE) == 2, tally.summary()


# --- 8: the libp2p host fails inside a node ---------------------------------------------

FAULTS_ENV = {"MESHOLLAMA_TEST_FAULTS": "1"}


async def test_a_failed_libp2p_host_is_restarted_and_rejoins(tmp_path):
    # Two slots on B: the second local request has one free (a queue is not what this tests).
    holder_env = {**FAULTS_ENV, "MESHOLLAMA_OLLAMA_NUM_PARALLEL": "2"}
    tally = Tally()
    with trio.fail_after(120):
        async with mesh(tmp_path, 1, fake_kw=FAKE, a_env=FAULTS_ENV, holder_env=holder_env) as m:
            (b,) = m.holders

            async def status() -> dict:
                r = await m.c.client.get(b.api + "/api/mesh/status")
                r.raise_for_status()
                return r.json()["mesh"]

            assert (await status())["host_restarts"] == 0
            failed = trio.Event()
            local = []

            injected = []

            async def fail_host(headers: httpx.Headers) -> None:
                m.c.signal(b, signal.SIGUSR2)
                injected.append(True)
                failed.set()

            async def in_flight() -> None:
                # A local answer in flight through B's gateway when the host fails must not notice.
                try:
                    local.append(await send_watching(m.client, b.api, "/api/chat", payload("/api/chat"),
                                                     deadline=DEADLINE, after_lines=BREAK_AFTER, on_lines=fail_host))
                finally:
                    failed.set()

            async def right_after() -> None:
                # A request to B's own gateway right after the failure: its local model still answers.
                await failed.wait()
                local.append(await send_watching(m.client, b.api, "/api/generate", payload("/api/generate"),
                                                 deadline=DEADLINE))

            async with trio.open_nursery() as n:
                n.start_soon(in_flight)
                n.start_soon(right_after)
            assert injected, f"the answer never reached {BREAK_AFTER} lines: {local}"
            for s in local:
                tally.add(s.outcome)
                assert s.fate is Fate.COMPLETE, f"local request during the host failure: {s}\n{m.log(b)}"
                assert continuous(s.outcome.text, TEXT), f"local: {discontinuity(s.outcome.text, TEXT)}"

            async def restarted() -> bool:
                s = await status()
                return s["host_restarts"] == 1 and s["host"] == "running"

            with trio.fail_after(30):
                await m.c.wait_until(restarted)
            with trio.fail_after(30):
                await m.wait_routable()
            sent = await send_watching(m.client, m.a.api, "/api/chat", payload("/api/chat"), deadline=DEADLINE)
            tally.add(sent.outcome)
            assert sent.fate is Fate.COMPLETE, f"routed to B after its host restarted: {sent}\n{m.log()}"
            assert sent.first_peer == b.peer_id, sent
            assert (await status())["host_restarts"] == 1
    tally.assert_none_lost()
    assert tally.count(Fate.ERROR) == 0, tally.summary()


# --- 9: a rolling restart under load ---------------------------------------------------

LOAD_TOKENS = 20
LOAD_TEXT = numbered_text(LOAD_TOKENS)
LOAD_EVERY = 0.4  # seconds between new streams; answers take about 1.6 s: about 4 in flight


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHOLLAMA_")} | {"PYTHONUNBUFFERED": "1"}


async def drain_with_cli(m: Mesh, node) -> str:
    """``meshollama drain``: it returns once the node has stopped."""
    done = await trio.run_process(
        [sys.executable, "-m", "meshollama", "drain", "--api", node.api, "--data-dir", str(node.data_dir)],
        capture_stdout=True, capture_stderr=True, check=False, env=_cli_env())
    said = f"{node.name}: meshollama drain rc={done.returncode} {done.stdout.decode().strip()!r} " \
           f"{done.stderr.decode().strip()!r}"
    assert done.returncode == 0, f"{said}\n{m.log(node)}"
    return said


async def drain_with_signal(m: Mesh, node) -> str:
    m.c.signal(node, signal.SIGUSR1)
    return f"{node.name}: SIGUSR1"


async def test_a_rolling_restart_under_load_loses_nothing(tmp_path):
    # Each holder runs several answers at once, so the load does not just pile up in A's queue.
    config = write_config(tmp_path / "holder.yaml", "ollama:\n  num_parallel: 4\n")
    fake_kw = {"text": LOAD_TEXT, "tokens": LOAD_TOKENS, "token_delay": 0.08}
    tally = Tally()
    broken: list[str] = []
    drains: list[str] = []
    with trio.fail_after(180):
        async with mesh(tmp_path, 3, fake_kw=fake_kw, holder_args=("--config", str(config))) as m:
            stop = trio.Event()

            async def one(i: int) -> None:
                path = PATHS[i % len(PATHS)]
                sent = await send_watching(m.client, m.a.api, path, payload(path), deadline=DEADLINE)
                tally.add(sent.outcome)
                if sent.fate is Fate.COMPLETE and not continuous(sent.outcome.text, LOAD_TEXT):
                    broken.append(f"{path}: {discontinuity(sent.outcome.text, LOAD_TEXT)}; {sent}")

            async def load(nursery: trio.Nursery) -> None:
                i = 0
                while not stop.is_set():
                    nursery.start_soon(one, i)
                    i += 1
                    with trio.move_on_after(LOAD_EVERY):
                        await stop.wait()

            # Two holders drained by the CLI, the last by SIGUSR1.
            how = [drain_with_cli, drain_with_cli, drain_with_signal]
            async with trio.open_nursery() as n:
                n.start_soon(load, n)
                try:
                    with trio.fail_after(10):
                        while len(tally.outcomes) < 3:  # the load runs
                            await trio.sleep(0.1)
                    for node, slot, drain in zip(m.holders, m.slots, how):
                        fake = slot.fake
                        with trio.fail_after(10):  # drain while the node has answers in flight
                            await fake.wait_for(lambda fake=fake: fake.active > 0)
                        drains.append(await drain(m, node))
                        with trio.fail_after(30):
                            code = await m.c.wait_exit(node)
                        assert code == 0, f"{node.name} exited {code} after its drain\n{m.log(node)}"
                        await m.c.restart(node)
                        with trio.fail_after(30):
                            await m.wait_routable([node])
                    stop_at = len(tally.outcomes) + 3
                    with trio.fail_after(15):
                        while len(tally.outcomes) < stop_at:  # and keeps running after the last restart
                            await trio.sleep(0.1)
                finally:
                    stop.set()
    summary = tally.summary() + "\n" + "\n".join(drains)
    assert len(tally.outcomes) >= 10, summary
    tally.assert_none_lost()
    assert tally.count(Fate.ERROR) == 0, summary
    assert not broken, "\n".join(broken[:5])
    # A drain finishes what is in flight: nothing had to be resumed elsewhere or cut at a backend.
    resumed = [o for o in tally.outcomes if len(o.peers) > 1]
    assert not resumed, f"{len(resumed)} answers were resumed, e.g. {resumed[0]}\n{summary}"
    aborted = {node.name: slot.fake.aborted for node, slot in zip(m.holders, m.slots)}
    assert not any(aborted.values()), f"answers cut at the holders' Ollamas: {aborted}\n{summary}"
