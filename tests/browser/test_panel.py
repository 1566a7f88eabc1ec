"""The panel in a real browser against real nodes: stand-in Ollama backends, one test with the real model.

Each test drives the system Chromium through Playwright (see ``browser.py``)
and saves a screenshot of each page it visits to its tmp dir, or to
``$MESHOLLAMA_SCREENSHOTS`` (``MESHOLLAMA_SCREENSHOTS=docs/img`` refreshes the
documentation's pictures).
"""

from __future__ import annotations

import re
import signal
import socket
from functools import partial

import httpx
import pytest
import trio

from meshollama.gateway.roles import Role
from tests.fakes.fake_ollama import serve_fake
from tests.gateway.test_roles import _keys
from tests.integration.cluster import cluster

from .browser import PHONE, SCREENSHOTS_ENV, Browser, missing, screenshot

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nodes_do_not_see_the_screenshot_dir(monkeypatch):
    monkeypatch.delenv(SCREENSHOTS_ENV, raising=False)


@pytest.fixture(scope="module")
def browser():
    reason = missing()
    if reason:
        pytest.skip(reason)
    b = Browser()
    b.start()
    try:
        yield b
    finally:
        b.close()


def ollama_args(fake) -> tuple[str, ...]:
    return ("--backend", "ollama", "--ollama-url", fake.url)


def wait_js(page, expression: str, arg=None, timeout: float = 20_000) -> None:
    page.wait_for_function(expression, arg=arg, timeout=timeout)


ROWS = "(n) => document.querySelectorAll('#peers-body tr[data-state=alive]').length === n"
# Records every text the last assistant message shows, to prove the answer arrived in pieces.
WATCH_CHAT = """() => {
  window.chatTexts = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('#transcript .msg.assistant .content');
    if (all.length) window.chatTexts.push(all[all.length - 1].textContent);
  }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
}"""


def chat(page, model: str, prompt: str, timeout: float = 20_000) -> dict:
    page.click("#tab-chat")
    page.evaluate(WATCH_CHAT)
    page.select_option("#chat-model", model)
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    page.wait_for_selector("#transcript .msg.assistant[data-done]", timeout=timeout)
    return page.evaluate("""() => ({
      texts: window.chatTexts, done: document.querySelector('.msg.assistant').dataset.done,
      text: document.querySelector('.msg.assistant .content').textContent,
      meta: document.querySelector('.msg.assistant .meta').textContent})""")


async def _start(c, out, name, *args, bootstrap):
    out.append(await c.start(name, *args, bootstrap=bootstrap))


async def test_the_whole_mesh_live_in_one_page(tmp_path, browser: Browser):
    """Peers and models listed; a chat streams; traffic charted; a node joining and one
    killed show up without a reload."""
    with trio.fail_after(150):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fakes = [await fn.start(partial(serve_fake, [f"model{i}:latest"], name=f"n{i}", token_delay=0.05))
                     for i in range(4)]
            a = await c.start("a", *ollama_args(fakes[0]))
            others: list = []
            async with trio.open_nursery() as starter:
                for i, name in ((1, "b"), (2, "k")):
                    starter.start_soon(partial(_start, c, others, name, *ollama_args(fakes[i]), bootstrap=a))
            page = await browser.page(a.api + "/ui/")
            # 1. every peer, alive, with its models; this node marked
            await browser.run(wait_js, page, ROWS, 3)
            await browser.run(wait_js, page, "() => document.querySelectorAll('#models-body tr[data-model]').length === 3")
            text = await browser.run(page.inner_text, "#peers-body")
            assert all(f"model{i}:latest" in text for i in range(3)) and "this node" in text
            self_row = await browser.run(page.get_attribute, "#peers-body tr.self", "data-peer")
            assert self_row == a.peer_id
            await browser.run(page.evaluate, "() => { window.loadMarker = 'still here'; }")

            # 3. a chat through the gateway streams tokens
            got = await browser.run(chat, page, "model1:latest", "Say hello")
            assert got["done"] == "done" and got["text"].strip(), got
            assert len(set(got["texts"])) >= 3, got["texts"]  # several updates before done
            assert "tokens" in got["meta"]
            await screenshot(browser, page, tmp_path, "chat")

            # the traffic tab, after some more requests through the gateway
            async with httpx.AsyncClient(timeout=20) as client, trio.open_nursery() as load:
                for i in range(12):
                    load.start_soon(partial(client.post, a.api + "/api/generate",
                                            json={"model": f"model{i % 3}:latest", "prompt": "x", "stream": False}))
            await browser.run(page.click, "#tab-traffic")
            await browser.run(wait_js, page, "() => document.querySelectorAll('#recent-body tr').length >= 13")
            recent = await browser.run(page.inner_text, "#recent-body")
            assert "/api/chat" in recent and "model1:latest" in recent
            await browser.run(page.check, "input[name=by][value=models]")
            await browser.run(wait_js, page, "() => [...document.querySelectorAll('#legend-rps li')]"
                                             ".map((li) => li.textContent).sort().join() === 'model0:latest,model1:latest,model2:latest'")
            await screenshot(browser, page, tmp_path, "traffic")

            # 2. a fourth node joins, then one is killed: the page follows without a reload
            await browser.run(page.click, "#tab-mesh")
            await _start(c, others, "d", *ollama_args(fakes[3]), bootstrap=a)
            await browser.run(wait_js, page, ROWS, 4)
            k = next(n for n in others if n.name == "k")
            c.signal(k, signal.SIGKILL)
            await browser.run(wait_js, page, f"() => document.querySelector('#peers-body tr[data-peer=\"{k.peer_id}\"]')"
                                             "?.dataset.state === 'down'", None, 30_000)
            assert await browser.run(page.evaluate, "() => window.loadMarker") == "still here"
            assert await browser.run(page.evaluate, "() => performance.getEntriesByType('navigation').length") == 1
            await screenshot(browser, page, tmp_path, "mesh")
            phone = await browser.page(a.api + "/ui/", PHONE)
            await browser.run(wait_js, phone, ROWS, 3)
            await screenshot(browser, phone, tmp_path, "phone")
            errors = page.errors + phone.errors
            await browser.run(lambda: (page.context.close(), phone.context.close()))
            assert not errors, errors
            fn.cancel_scope.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_keys(data_dir) -> dict[Role, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return _keys(data_dir)


def sign_in(page, key: str) -> None:
    page.wait_for_selector("#login", state="visible")
    page.fill("#key", key)
    page.click("#login button[type=submit]")


ADMIN_CONTROLS = "() => document.querySelectorAll('#models-body form.copies, #models-body button.danger').length"
WATCH_PULL = """() => {
  window.pullTexts = [];
  new MutationObserver(() => {
    const s = document.querySelector('#pull-progress .pull-status');
    if (s) window.pullTexts.push(s.textContent);
  }).observe(document.getElementById('pull-progress'), {subtree: true, childList: true, characterData: true});
}"""


async def test_roles_sign_in_and_an_admin_pull(tmp_path, browser: Browser):
    """A wrong key shows the login again; read-only sees no management; admin pulls with progress."""
    keys = _write_keys(tmp_path / "a")
    with trio.fail_after(120):
        async with trio.open_nursery() as fn, cluster(tmp_path) as c:
            fake = await fn.start(partial(serve_fake, ["model0:latest"], name="a", token_delay=0.25))
            # A fixed port, so that the page can find the node again after its restart below.
            a = await c.start("a", *ollama_args(fake), "--api-listen", f"127.0.0.1:{_free_port()}",
                              env={"MESHOLLAMA_OLLAMA_REFRESH_INTERVAL": "0.5"})
            page = await browser.page(a.api + "/ui/")
            await browser.run(page.wait_for_selector, "#login", state="visible")
            await screenshot(browser, page, tmp_path, "login")
            await browser.run(sign_in, page, "not-a-key")
            await browser.run(wait_js, page, "() => document.getElementById('login-error').textContent"
                                             ".includes('was not accepted') && !document.getElementById('login').hidden")

            # read-only: the mesh, no management buttons, no chat
            await browser.run(sign_in, page, keys[Role.READONLY])
            await browser.run(page.wait_for_selector, "#models-body tr[data-model]", state="attached")
            await browser.run(page.click, "#tab-models")
            assert await browser.run(page.is_hidden, "#pull-form")
            assert await browser.run(page.evaluate, ADMIN_CONTROLS) == 0
            assert await browser.run(page.inner_text, "#role") == "readonly-key, readonly"
            await browser.run(page.click, "#tab-chat")
            assert await browser.run(page.is_visible, "#chat-readonly")
            assert await browser.run(page.is_disabled, "#chat-send")
            stored = await browser.run(page.evaluate, "() => [sessionStorage.length, localStorage.length]")
            assert stored == [1, 0] and keys[Role.READONLY] not in page.url
            await browser.run(page.click, "#signout")

            # admin: pull, copy count and delete buttons; tabs work from the keyboard
            await browser.run(sign_in, page, keys[Role.ADMIN])
            await browser.run(page.wait_for_selector, "#models-body form.copies", state="attached")
            await browser.run(page.focus, "#tab-chat")
            await browser.run(page.keyboard.press, "ArrowLeft")
            assert await browser.run(page.get_attribute, "#tab-models", "aria-selected") == "true"
            assert await browser.run(page.evaluate, "() => document.activeElement.id") == "tab-models"
            assert await browser.run(page.is_visible, "#pull-form")
            assert await browser.run(page.is_visible, "#models-body button.danger")
            await browser.run(page.evaluate, WATCH_PULL)
            await browser.run(page.fill, "#pull-name", "tinyllama:1b")
            await browser.run(page.click, "#pull-button")
            await browser.run(wait_js, page, "() => document.querySelector('#models-body tr[data-model=\"tinyllama:1b\"]')"
                                             " && window.pullTexts.some((t) => t.endsWith(': success'))")
            texts = await browser.run(page.evaluate, "() => window.pullTexts")
            percents = [int(m.group(1)) for t in texts if (m := re.search(r"\((\d+)%\)$", t))]
            assert any(0 < p < 100 for p in percents) and percents[-1] == 100, texts  # progress, live
            assert any("pulling manifest" in t for t in texts), texts
            assert await browser.run(page.evaluate, "() => [...document.querySelectorAll('#pull-progress progress')]"
                                                    ".every((p) => p.value === p.max)")
            await screenshot(browser, page, tmp_path, "models")

            await browser.run(page.fill, "#copies-model0\\:latest", "2")
            await browser.run(page.click, "#copies-set-model0\\:latest")
            await browser.run(wait_js, page, "() => document.getElementById('models-msg').textContent"
                                             ".includes('keeping 2 copies')")
            await browser.run(page.click, "#delete-tinyllama\\:1b")
            await browser.run(page.click, "#confirm-delete")
            await browser.run(page.wait_for_selector, "#models-body tr[data-model=\"tinyllama:1b\"]", state="detached")

            # the node restarts: the page notices, backs off, reconnects by itself, still signed in
            await browser.run(page.evaluate, "() => { window.loadMarker = 'still here'; }")
            c.signal(a, signal.SIGTERM)
            await c.wait_exit(a)
            await browser.run(wait_js, page, "() => document.getElementById('conn').dataset.state !== 'live'")
            await c.restart(a)
            await browser.run(wait_js, page, "() => document.getElementById('conn').dataset.state === 'live'",
                              None, 40_000)
            assert await browser.run(page.evaluate, "() => window.loadMarker") == "still here"
            assert await browser.run(page.is_visible, "#pull-form")  # still the admin, no login asked
            errors = [e for e in page.errors if "ERR_CONNECTION_REFUSED" not in e and "Failed to fetch" not in e]
            await browser.run(page.context.close)
            # the 401 of the wrong key is the only console error a browser reports
            assert all("401" in e for e in errors), errors
            fn.cancel_scope.cancel()


def _embedded_missing() -> str | None:
    from meshollama.backends.embedded import available, default_model_path

    if not available() or default_model_path() is None:
        return "llama-cpp-python or the SmolLM2 model is not installed (run make install)"
    return None


@pytest.mark.embedded
async def test_the_playground_streams_a_real_answer_from_the_embedded_model(tmp_path, browser: Browser):
    reason = _embedded_missing()
    if reason:
        pytest.skip(reason)
    with trio.fail_after(180):
        async with cluster(tmp_path) as c:
            node = await c.start("e", "--backend", "embedded")
            page = await browser.page(node.api + "/ui/#chat")
            await browser.run(page.wait_for_selector, "#chat-model option[value=\"smollm2:135m\"]", state="attached")
            got = await browser.run(chat, page, "smollm2:135m", "Why is the sky blue? Answer in two sentences.",
                                    150_000)
            assert got["done"] == "done", got
            assert len(got["text"].split()) >= 3 and len(set(got["texts"])) >= 3, got
            await screenshot(browser, page, tmp_path, "chat-smollm2")
            errors = page.errors
            await browser.run(page.context.close)
            assert not errors, errors
