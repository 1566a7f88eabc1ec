"""Holders found through DHT provider records (``mesh.holders``) and the holds
question (``/meshollama/holds/1``): scripted DHT and peers, virtual time."""

from __future__ import annotations

import json
import random

import pytest
import trio

from meshollama import names
from meshollama.catalog import LoadInfo, ModelInfo
from meshollama.errors import P2PError
from meshollama.mesh import announce, holders, load_client, load_server, providing
from meshollama.mesh.holders import Found, HolderFinder
from meshollama.mesh.providing import Pace, Provider, name_key
from tests.unit.test_mesh_sync import pipe

LOAD = LoadInfo(in_flight=1, capacity=4)


def found(pid: str, busy: int = 0) -> Found:
    return Found(pid, "d" * 64, False, LoadInfo(in_flight=busy, capacity=4))


class Dht:
    """Scripted provider records; counts lookups, can hang."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.lookups: list[str] = []
        self.hang = False
        self.running = 0
        self.most = 0

    async def find(self, key: str) -> list[str]:
        self.lookups.append(key)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(0.2)
            if self.hang:
                await trio.sleep_forever()
            return list(self.records.get(key, []))
        finally:
            self.running -= 1


def finder(dht: Dht, holds: dict[str, object], *, asked: list[str] | None = None, counts=None, rank=None,
           forgot: list | None = None):
    """``holds[peer]``: a Found, None (no), "silent" (never answers), "error" (P2PError) or
    "refused"; a peer not listed is silent."""

    async def ask(peer_id: str, model: str) -> Found | None:
        if asked is not None:
            asked.append(peer_id)
        await trio.sleep(0.01)
        answer = holds.get(peer_id, "silent")
        if answer == "silent":
            await trio.sleep_forever()
        if answer in ("error", "refused"):
            raise P2PError(f"{peer_id}: {answer}")
        return answer

    return HolderFinder(dht.find, ask, self_id="me", rng=random.Random(1), rank=rank or (lambda pid: 2),
                        forget_provider=(lambda key, pid: forgot.append((key, pid))) if forgot is not None
                        else (lambda key, pid: None),
                        on_count=(counts.append if counts is not None else lambda what: None))


async def test_providers_that_say_yes_are_found_least_busy_first_and_we_are_not_asked(autojump_clock):
    dht = Dht({name_key("llama3"): ["me", "a", "b", "c"]})
    f = finder(dht, {"a": found("a", 3), "b": found("b", 1), "c": None})
    got = await f.find("Llama3:latest")  # any spelling of the name: one key
    assert [x.peer_id for x in got.found] == ["b", "a"] and got.unanswered == 0
    assert dht.lookups == [name_key("llama3")]


async def test_a_provider_that_fails_or_refuses_does_not_lose_the_request(autojump_clock):
    """A dead record, an older node without the holds protocol, a refusal: counted as
    unanswered, skipped for a while, and the others' answers stand."""
    dht = Dht({name_key("m"): ["dead", "old", "a"]})
    counts: list[str] = []
    f = finder(dht, {"dead": "error", "old": "refused", "a": found("a")}, counts=counts)
    got = await f.find("m")
    assert [x.peer_id for x in got.found] == ["a"]  # the others' retries were cut 0.1 s after a's yes
    only_dead = finder(Dht({name_key("m"): ["dead", "old"]}), {"dead": "error", "old": "refused"}, counts=counts)
    got = await only_dead.find("m")
    assert got.found == [] and got.unanswered == 2 and got.complete  # the gateway answers 503, not "not found"
    assert counts.count("failed") == 2
    await trio.sleep(holders.FRESH)
    got = await only_dead.find("m")  # within FAILED_TTL: not asked again, still "did not answer"
    assert got.found == [] and got.unanswered == 2 and counts.count("failed") == 2


async def test_answers_are_shared_by_requests_at_once_and_reused_for_a_second(autojump_clock):
    """A holder answers one question per peer per 0.1 s: five requests at once must not
    ask it five times (four were refused, and four clients got errors)."""
    dht = Dht({name_key("m"): ["a"]})
    asked: list[str] = []
    f = finder(dht, {"a": found("a")}, asked=asked)
    results = []

    async def one():
        results.append(await f.find("m"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert [len(r.found) for r in results] == [1] * 5 and asked == ["a"]
    await f.find("m")
    assert asked == ["a"]
    await trio.sleep(holders.FRESH)
    await f.find("m")
    assert asked == ["a", "a"]


async def test_the_provider_list_is_cached_and_a_no_leaves_it_and_our_dht_store(autojump_clock):
    dht = Dht({name_key("m"): ["a", "b"]})
    asked: list[str] = []
    forgot: list = []
    f = finder(dht, {"a": found("a"), "b": None}, asked=asked, forgot=forgot)
    assert [x.peer_id for x in (await f.find("m")).found] == ["a"]
    await trio.sleep(holders.FRESH)
    assert [x.peer_id for x in (await f.find("m")).found] == ["a"]
    assert len(dht.lookups) == 1 and asked.count("b") == 1  # b said no once: not asked again
    assert forgot == [(name_key("m"), "b")]
    await trio.sleep(holders.PROVIDERS_TTL)
    await f.find("m")
    assert len(dht.lookups) == 2


async def test_table_peers_are_asked_first_strangers_only_if_they_fail_and_barred_peers_never(autojump_clock):
    providers = ["s1", "c2", "c3", "c1", "barred"]
    rank = {"c1": 0, "c2": 0, "c3": 1, "barred": None}
    asked: list[str] = []
    f = finder(Dht({name_key("m"): providers}), {"c1": "error", "c2": "error", "c3": "error", "s1": found("s1"),
                                                  "barred": found("barred")},
               asked=asked, rank=lambda pid: rank.get(pid, 2))
    got = await f.find("m")
    assert set(asked[:-1]) == {"c1", "c2", "c3"}  # the first wave: the best ranked (each asked TRIES times)
    assert len(asked) == 3 * holders.TRIES + 1
    assert asked[-1] == "s1" and "barred" not in asked  # a second wave, after all of them failed
    assert [x.peer_id for x in got.found] == ["s1"] and got.unanswered == 3
    asked.clear()
    await trio.sleep(holders.FRESH)
    await f.find("m")
    assert asked == ["s1"]  # those that failed: skipped for FAILED_TTL


async def test_nobody_is_remembered_briefly_so_a_flood_of_unknown_names_costs_one_lookup_each(autojump_clock):
    dht = Dht({})
    counts: list[str] = []
    f = finder(dht, {}, counts=counts)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(f.find, "nobody-has-it")
    assert len(dht.lookups) == 1  # fifty requests at once share one lookup
    assert (await f.find("nobody-has-it")).found == [] and len(dht.lookups) == 1
    await trio.sleep(holders.NOBODY_TTL)
    await f.find("nobody-has-it")
    assert len(dht.lookups) == 2 and counts.count("none") == 52 and counts.count("lookup") == 2


async def test_lookups_for_many_names_run_a_few_at_a_time(autojump_clock):
    dht = Dht({})
    f = finder(dht, {})
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(f.find, f"m{i}")
    assert dht.most == holders.LOOKUPS
    assert len(dht.lookups) == 40  # 10 rounds of 0.2 s: within WAIT


async def test_a_lookup_cut_short_is_not_kept_as_nobody(autojump_clock):
    """The request that owned a lookup went away (or waited past WAIT for a lookup slot):
    the others waiting on it, and the next request, look again; nobody is told 'not found'
    for 10 s because of it."""
    dht = Dht({name_key("m"): ["a"]})
    f = finder(dht, {"a": found("a")})
    with trio.move_on_after(0.1):  # the owner leaves mid-lookup
        await f.find("m")
    assert f._pending == {} and name_key("m") not in f._lists and "registry.ollama.ai/library/m:latest" not in f._lists
    assert [x.peer_id for x in (await f.find("m")).found] == ["a"]
    # A flood of unknown names fills the lookup slots: a real model's lookup waits, times out, is not kept.
    slow = Dht({name_key("real"): ["a"]})
    slow.hang = True
    g = finder(slow, {"a": found("a")})
    async with trio.open_nursery() as nursery:
        for i in range(holders.LOOKUPS):
            nursery.start_soon(g.find, f"junk{i}")
        await trio.sleep(0.01)
        assert (await g.find("real")).found == []  # past WAIT
    slow.hang = False
    assert [x.peer_id for x in (await g.find("real")).found] == ["a"]


async def test_a_hanging_dht_or_silent_providers_cost_a_request_wait_and_no_more(autojump_clock):
    dht = Dht({name_key("m"): ["a", "b"]})
    f = finder(dht, {})  # both silent
    started = trio.current_time()
    got = await f.find("m")
    assert got.found == [] and got.unanswered == 2
    assert trio.current_time() - started == pytest.approx(0.2 + holders.ASK_TIMEOUT, abs=0.05)
    dht.hang = True
    started = trio.current_time()
    assert (await f.find("other")).found == []
    assert trio.current_time() - started == pytest.approx(holders.WAIT, abs=0.01)


async def test_only_a_few_providers_are_asked_when_the_first_say_yes(autojump_clock):
    dht = Dht({name_key("m"): [f"p{i}" for i in range(100)]})
    asked: list[str] = []
    f = finder(dht, {f"p{i}": found(f"p{i}") for i in range(100)}, asked=asked)
    assert len((await f.find("m")).found) == holders.SAMPLE and len(asked) == holders.SAMPLE


# --- pacing and providing -----------------------------------------------------------------------


async def test_pace_lets_a_burst_through_per_window_and_a_names_pass_goes_before_blobs(autojump_clock):
    """Provides take time (a DHT lookup each): the names must still go first for their whole
    pass, not only while one of them waits for a permit."""
    pace = Pace()
    order: list[tuple[str, float]] = []

    async def blobs() -> None:
        for i in range(12):
            await pace.wait(later=True)
            order.append((f"blob{i}", trio.current_time()))
            await trio.sleep(0.2)  # its lookup and ADD_PROVIDER

    async def names_pass() -> None:
        with pace.names_pass():
            for i in range(12):
                await pace.wait()
                order.append((f"name{i}", trio.current_time()))
                await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blobs)
        await trio.sleep(0.01)
        nursery.start_soon(names_pass)
    # Every window: at most PROVIDE_BURST records, counted from the window's own start.
    starts: list[float] = []
    for _, at in order:
        if not starts or at - starts[-1] >= providing.PROVIDE_WINDOW:
            starts.append(at)
    per_window = [sum(1 for _, at in order if s0 <= at < s0 + providing.PROVIDE_WINDOW) for s0 in starts]
    assert max(per_window) <= providing.PROVIDE_BURST
    last_name = max(at for what, at in order if what.startswith("name"))
    blobs_before = [what for what, at in order if what.startswith("blob") and at < last_name]
    assert blobs_before == ["blob0"]  # only the one that started before the names pass
    assert len(order) == 24


async def test_the_provider_says_models_left_out_of_announcements_first_and_again_when_the_dht_grows(
        autojump_clock):
    models = [ModelInfo(f"m{i:03d}:1b", loaded=(i == 5)) for i in range(300)]
    said: list[str] = []
    size = [3]
    changed = [trio.Event()]  # a backend hands out a fresh event after each change

    async def provide(key: str) -> bool:
        said.append(key)
        return True

    async with trio.open_nursery() as nursery:
        provider = Provider(lambda: tuple(models), provide, lambda: changed[0], lambda: size[0])
        nursery.start_soon(provider.run)
        await trio.sleep(1)
        assert provider.status() == {"provided": 0, "pending": 300}
        await trio.sleep(providing.PROVIDE_FIRST)
        assert provider.status() == {"provided": 300, "pending": 0}
        fit = announce.fit(announce.Announcement(peer_id="p", seq=1, version="t", models=tuple(models), load=LOAD))
        assert fit.more
        left_out = {name_key(m.name) for m in models} - {name_key(m.name) for m in fit.models}
        assert set(said[: len(left_out)]) == left_out  # those only the DHT can tell
        assert len(said) == 300 and name_key("m005:1b") == said[-1]  # the loaded one is announced: last
        size[0] = 6  # the DHT's table doubled: records put into a small one may have reached few
        await trio.sleep(providing.RECHECK + 1)
        assert len(said) == 600
        await trio.sleep(providing.RECHECK + 1)
        assert len(said) == 600  # nothing changed: nothing said
        models.append(ModelInfo("new:1b"))
        changed[0], was = trio.Event(), changed[0]
        was.set()
        await trio.sleep(providing.CHANGE_GAP + 0.01)
        assert said[-1] == name_key("new:1b") and len(said) == 601
        nursery.cancel_scope.cancel()


async def test_the_provider_says_nothing_into_an_empty_dht_and_everything_once_it_has_peers(autojump_clock):
    said: list[str] = []
    size = [0]

    async def provide(key: str) -> bool:
        said.append(key)
        return True

    async with trio.open_nursery() as nursery:
        provider = Provider(lambda: tuple(ModelInfo(f"m{i}:1b") for i in range(20)), provide, trio.Event,
                            lambda: size[0])
        nursery.start_soon(provider.run)
        await trio.sleep(providing.PROVIDE_FIRST + 5 * providing.RECHECK)
        assert said == [] and provider.status() == {"provided": 0, "pending": 20}
        size[0] = 1
        await trio.sleep(providing.RECHECK + 1)
        assert len(said) == 20 and provider.status() == {"provided": 20, "pending": 0}
        nursery.cancel_scope.cancel()


def test_the_announcement_says_when_it_leaves_models_out():
    few = announce.fit(announce.Announcement(peer_id="p", seq=1, version="t", models=(ModelInfo("a:1b"),), load=LOAD))
    assert not few.more and "mm" not in json.loads(announce.encode(few))
    many = announce.fit(announce.Announcement(peer_id="p", seq=1, version="t", load=LOAD,
                                              models=tuple(ModelInfo(f"m{i}:1b") for i in range(300))))
    assert many.more and announce.decode(announce.encode(many)).more


# --- the holds question -----------------------------------------------------------------------


def server(held: dict[str, ModelInfo], counts: list[str] | None = None) -> load_server.LoadServer:
    return load_server.LoadServer(lambda: LOAD, holds=lambda key: held.get(key),
                                  on_count=(counts.append if counts is not None else lambda what: None))


async def ask_over_pipe(srv, question_name: str, peer: str = "asker") -> Found | None:
    client, far = pipe(peer)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(srv.handle_holds, far)

        async def open_stream(peer_id, protocol, *, timeout):
            assert protocol == load_server.HOLDS_PROTOCOL
            return client

        return await load_client.ask_holds(open_stream, "holder", question_name, timeout=1.0)


async def test_a_holder_answers_with_its_digest_loaded_flag_and_load(autojump_clock):
    model = ModelInfo("m300:1b", digest="ab" * 32, loaded=True)
    srv = server({names.key("m300:1b"): model})
    got = await ask_over_pipe(srv, "M300:1b")
    assert got == Found("holder", "ab" * 32, True, LOAD)
    await trio.sleep(1)
    assert await ask_over_pipe(srv, "other:1b") is None


async def test_the_holds_server_resets_nonsense_and_slow_questions(autojump_clock):
    counts: list[str] = []
    srv = server({}, counts)
    for i, raw in enumerate([b"\xff\xfe\n", b"../../etc\n", b"x" * 600, b"no-newline"]):
        client, far = pipe(f"asker{i}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.handle_holds, far)
            await client.write(raw)
            if raw == b"no-newline":
                await trio.sleep(load_server.QUESTION_DEADLINE + 1)  # trickled: never finished
        assert far.reset_called, raw
    assert counts == ["refused_question"] * 4


@pytest.mark.parametrize("answer", [b"[]\n", b'{"d": 5, "f": 0}\n', b'{"d": "x", "l": "yes"}\n',
                                    b'{"d": "' + b"x" * 600 + b'"}\n', b'{"f": -1}\n', b"not json\n"])
def test_a_holds_answer_is_bounded_like_an_announcement(answer):
    with pytest.raises(ValueError):
        load_client.decode_holds("p", answer)


def test_a_holds_answer_caps_the_load_it_claims():
    got = load_client.decode_holds("p", b'{"d": "ab", "l": false, "f": 10, "c": 999999, "q": 0}\n')
    assert got.load.capacity == announce.MAX_CAPACITY and got.digest == "ab" and not got.loaded


async def test_a_silent_holder_is_a_p2p_error_within_the_timeout(autojump_clock):
    client, far = pipe("asker")

    async def open_stream(peer_id, protocol, *, timeout):
        return client

    started = trio.current_time()
    with pytest.raises(P2PError):
        await load_client.ask_holds(open_stream, "holder", "m:1b", timeout=0.5)
    assert trio.current_time() - started == pytest.approx(0.5)


async def test_a_stream_that_fails_at_once_is_asked_again_shortly_after(autojump_clock):
    """The first stream on a connection the DHT lookup just opened can fail in negotiation:
    one more try, 0.2 s later, within the same time budget."""
    tries: list[float] = []

    async def ask(peer_id: str, model: str) -> Found | None:
        tries.append(trio.current_time())
        if len(tries) == 1:
            raise P2PError("failed to open a stream")
        return found(peer_id)

    f = HolderFinder(Dht({name_key("m"): ["a"]}).find, ask, self_id="me")
    got = await f.find("m")
    assert [x.peer_id for x in got.found] == ["a"] and got.unanswered == 0
    assert holders.RETRY_AFTER <= tries[1] - tries[0] <= 2 * holders.RETRY_AFTER


async def test_a_provider_our_table_has_down_or_one_that_failed_lately_is_a_retry_later_not_a_404(autojump_clock):
    f = finder(Dht({name_key("m"): ["a"]}), {"a": found("a")}, rank=lambda pid: holders.NOT_NOW)
    got = await f.find("m")
    assert got.found == [] and got.unanswered == 1


async def test_questions_about_several_models_to_one_holder_at_once_get_through_its_real_gate(autojump_clock):
    """Three hidden models on one holder, asked at once: the holder's gate takes one question
    per peer per gap; the retries (jittered) get the others through."""
    held = {names.key(f"h{i}:1b"): ModelInfo(f"h{i}:1b", digest="ab" * 32) for i in range(3)}
    srv = load_server.LoadServer(lambda: LOAD, holds=lambda key: held.get(key))

    async def ask(peer_id: str, model: str) -> Found | None:
        client, far = pipe("gateway")

        async def open_stream(pid, protocol, *, timeout):
            return client

        failed: P2PError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(srv.handle_holds, far)
            try:
                return await load_client.ask_holds(open_stream, peer_id, model, timeout=holders.ASK_TIMEOUT)
            except P2PError as exc:  # as a stream would: not wrapped in the nursery's group
                failed = exc
        raise failed

    dht = Dht({name_key(f"h{i}:1b"): ["holder"] for i in range(3)})
    f = HolderFinder(dht.find, ask, self_id="me", rng=random.Random(3))
    results = {}

    async def one(i: int) -> None:
        results[i] = await f.find(f"h{i}:1b")

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(one, i)
    assert {i: [x.peer_id for x in r.found] for i, r in results.items()} == {i: ["holder"] for i in range(3)}


async def test_a_lookup_or_question_cut_by_the_wait_says_so(autojump_clock):
    """Cut short by WAIT, the answer is 'retry later' (incomplete), never 'not found'."""
    slow = Dht({name_key("m"): ["a"]})
    slow.hang = True
    got = await finder(slow, {"a": found("a")}).find("m")
    assert got.found == [] and not got.complete


async def test_a_stranger_to_a_closed_mesh_learns_nothing_from_the_holds_question(autojump_clock):
    """The holds question says which models we hold: in a closed mesh only admitted peers
    get an answer; a stranger's stream is reset before its question is even read."""
    counts: list[str] = []
    held = {names.key("secret:1b"): ModelInfo("secret:1b", digest="ab" * 32)}
    srv = load_server.LoadServer(lambda: LOAD, holds=lambda key: held.get(key), allow=lambda p: p != "stranger",
                                 on_count=counts.append)
    client, far = pipe("stranger")
    await client.write(b"secret:1b\n")
    await srv.handle_holds(far)
    assert far.reset_called and not far.closed and counts == ["refused_not_admitted"]
    assert await client.read() == b""  # not a byte of an answer
    assert await ask_over_pipe(srv, "secret:1b", peer="member") == Found("holder", "ab" * 32, False, LOAD)
