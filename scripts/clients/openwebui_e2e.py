#!/usr/bin/env python3
"""Open WebUI, end to end in headless Chromium, against a meshollama node serving SmolLM2.

Run with the venv that scripts/clients/setup.sh makes (it has Open WebUI and
Playwright; Debian's chromium is the browser):

    .cache/clients/openwebui-venv/bin/python scripts/clients/openwebui_e2e.py

What it does, everything on 127.0.0.1 with OS-chosen ports and a deadline:

1. starts ``meshollama start --backend embedded`` from .venv (temp data dir);
2. starts the recording proxy (``record.py serve --upstream <node>``), which
   forwards every request to the node and logs it;
3. starts ``open-webui serve`` with OLLAMA_BASE_URL at the recorder,
   WEBUI_AUTH=False, ENABLE_OPENAI_API=False and OFFLINE_MODE (no Hugging
   Face downloads, no version check; embeddings through Ollama, so no local
   sentence-transformers model is loaded);
4. opens the page in Chromium (any request off 127.0.0.1 is blocked and
   listed), types a question, sends it, waits until Open WebUI has stored the
   answer, takes a screenshot, and fails if the answer is an error bubble or
   empty;
5. writes into the results dir: ``chat.png``, ``requests.json`` (every
   request Open WebUI sent to the node, with the node's status and the
   first bytes of its answer), ``summary.json``, and the logs of the three
   servers; with ``--update-fixture`` also
   ``tests/clients/recordings/openwebui.json`` for the replay tests.

``--canned`` answers Open WebUI with the recorder's canned answers instead of
the node (to record Open WebUI's whole flow while the node cannot answer).
Exit status: 0 when the answer came back and is no error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
NODE_PY = ROOT / ".venv/bin/python"
RECORD = ROOT / "scripts/clients/record.py"
FIXTURE = ROOT / "tests/clients/recordings/openwebui.json"
MODEL = "smollm2:135m"
QUESTION = "Why is the sky blue? Answer in one sentence."


def log(msg: str) -> None:
    print(f"openwebui-e2e: {msg}", flush=True)


class Procs:
    """Child processes, each in a session of its own, stopped by their ids on exit."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, args: list[str], logfile: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        out = open(logfile, "ab")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)


def wait_for(what: str, predicate, timeout: float, proc: subprocess.Popen | None = None, logfile: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-3000:] if logfile else ""
            raise SystemExit(f"{what}: the process exited with {proc.returncode}\n{tail}")
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    tail = logfile.read_text(errors="replace")[-3000:] if logfile else ""
    raise SystemExit(f"{what}: not ready after {timeout:.0f}s\n{tail}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(procs: Procs, tmp: Path, results: Path) -> str:
    data = tmp / "node"
    data.mkdir()
    logfile = results / "meshollama.log"
    proc = procs.start("meshollama", [
        str(NODE_PY), "-m", "meshollama", "start", "--data-dir", str(data),
        "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", "127.0.0.1:0", "--no-mdns",
        "--backend", "embedded", "--log-level", "info"], logfile, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ready():
        try:
            info = json.loads((data / "node.json").read_text())
        except (OSError, ValueError):
            return None
        return info["api_url"] if info.get("pid") == proc.pid else None

    api = wait_for("meshollama", ready, 120, proc, logfile)
    log(f"meshollama node at {api}")
    return api


def start_recorder(procs: Procs, results: Path, upstream: str | None) -> str:
    logfile = results / "recorder.log"
    args = [sys.executable, str(RECORD), "serve", "--log", str(results / "requests.json")]
    args += ["--upstream", upstream] if upstream else ["--no-tool-calls"]
    proc = procs.start("recorder", args, logfile)

    def ready():
        text = logfile.read_text() if logfile.exists() else ""
        for line in text.splitlines():
            if line.startswith("listening on "):
                return line.split()[-1]
        return None

    url = wait_for("recorder", ready, 30, proc, logfile)
    log(f"recorder at {url} -> {upstream or 'canned answers'}")
    return url


def name_requests(recorder: str, name: str) -> None:
    req = urllib.request.Request(recorder + "/__recorder__/name", data=name.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


def openwebui_env(tmp: Path, ollama_url: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OLLAMA_HOST", "OPENAI_API_BASE_URL", "OPENAI_API_KEY", "HTTP_PROXY", "HTTPS_PROXY")}
    env.update({
        "DATA_DIR": str(tmp / "openwebui"),
        "OLLAMA_BASE_URL": ollama_url,
        "ENABLE_OLLAMA_API": "True",
        "ENABLE_OPENAI_API": "False",
        "WEBUI_AUTH": "False",
        "WEBUI_SECRET_KEY": "meshollama-e2e-test-key-not-a-secret-0123456789",
        "DEFAULT_MODELS": MODEL,
        # Offline: no Hugging Face downloads, no version check. Embeddings go
        # through Ollama (the node), so no sentence-transformers model loads.
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAG_EMBEDDING_ENGINE": "ollama",
        "RAG_EMBEDDING_MODEL": MODEL,
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
        "WHISPER_MODEL_AUTO_UPDATE": "False",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "ENABLE_WEB_SEARCH": "False",
        "ENABLE_COMMUNITY_SHARING": "False",
        "ANONYMIZED_TELEMETRY": "False",
        "DO_NOT_TRACK": "True",
        "SCARF_NO_ANALYTICS": "True",
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    })
    return env


def start_openwebui(procs: Procs, tmp: Path, results: Path, ollama_url: str, timeout: float) -> str:
    exe = Path(sys.executable).parent / "open-webui"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing: run scripts/clients/setup.sh")
    port = free_port()
    logfile = results / "openwebui.log"
    (tmp / "openwebui").mkdir()
    proc = procs.start("open-webui", [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)], logfile,
                       env=openwebui_env(tmp, ollama_url), cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    wait_for("open-webui", lambda: http_ok(url + "/health"), timeout, proc, logfile)
    log(f"open-webui at {url} (up in {time.monotonic() - t0:.0f}s)")
    return url


# --- the browser -------------------------------------------------------------------

ERROR_SELECTORS = (
    # 0.12: the grey box with an (i) icon that takes the answer's place on failure
    ".chat-assistant #response-content-container > div:has(> svg)",
    # older releases: Error.svelte's red bubble
    ".chat-assistant [class*='border-red']",
    ".chat-assistant [class*='bg-red']",
)
ANSWER_SELECTOR = ".chat-assistant #response-content-container .markdown-prose"


def settle(requests_log: Path, quiet: float = 8.0, limit: float = 120.0) -> None:
    """Wait until Open WebUI has sent nothing new for ``quiet`` seconds (title, tags, follow-ups come last)."""
    deadline = time.monotonic() + limit
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            entries = json.loads(requests_log.read_text())
            state = (len(entries), sum(1 for e in entries if "status" in e))
        except (OSError, ValueError):
            state = None
        if state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since >= quiet and state and state[0] == state[1]:
            return
        time.sleep(0.5)


def run_browser(base: str, results: Path, question: str, timeout: float, recorder: str) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium is missing: run scripts/clients/setup.sh")
    blocked: list[str] = []
    console: list[str] = []
    outcome: dict = {"question": question}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")

            def guard(route):
                url = route.request.url
                host = urlsplit(url).hostname
                if url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                    route.continue_()
                else:
                    blocked.append(url)
                    route.abort()

            ctx.route("**/*", guard)
            page = ctx.new_page()
            page.set_default_timeout(60_000)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                    else None)
            page.goto(base + "/", wait_until="domcontentloaded")
            chat_input = page.locator("#chat-input")
            chat_input.wait_for(state="visible", timeout=120_000)
            # A first start may open the changelog / "what's new" modal: close it.
            for label in ("Okay, Let's Go!", "Got it", "Close"):
                button = page.get_by_role("button", name=label)
                if button.count() and button.first.is_visible():
                    button.first.click()
            page.keyboard.press("Escape")
            page.screenshot(path=str(results / "start.png"))
            name_requests(recorder, "openwebui.send")
            chat_input.click()
            page.keyboard.type(question)
            page.keyboard.press("Enter")
            page.wait_for_url("**/c/**", timeout=60_000)
            chat_id = page.url.rstrip("/").split("/c/")[-1]
            outcome["chat_id"] = chat_id
            token = page.evaluate("() => localStorage.token")
            deadline = time.monotonic() + timeout
            message = None
            while time.monotonic() < deadline:
                r = page.request.get(f"{base}/api/v1/chats/{chat_id}",
                                     headers={"Authorization": f"Bearer {token}"})
                if r.ok:
                    history = (r.json().get("chat") or {}).get("history") or {}
                    replies = [m for m in (history.get("messages") or {}).values() if m.get("role") == "assistant"]
                    if replies and (replies[-1].get("done") or replies[-1].get("error")):
                        message = replies[-1]
                        break
                time.sleep(0.5)
            # Title, tags and follow-ups are asked for after the answer; then the page settles.
            settle(results / "requests.json")
            page.screenshot(path=str(results / "chat.png"), full_page=True)
            (results / "page.html").write_text(page.content())
            bubbles = [t for sel in ERROR_SELECTORS for t in page.locator(sel).all_inner_texts() if t.strip()]
            outcome.update({
                "answered": message is not None,
                "message": message and {k: message.get(k) for k in ("content", "error", "done", "model")},
                "error_bubbles": bubbles,
                "shown_answer": (page.locator(ANSWER_SELECTOR).all_inner_texts() or [""])[-1],
                "page_text": page.locator("#chat-container").inner_text()[-2000:]
                if page.locator("#chat-container").count() else "",
            })
        finally:
            browser.close()
    outcome["blocked_requests"] = sorted(set(blocked))
    outcome["console"] = console[-50:]
    return outcome


# --- the recording as a fixture -----------------------------------------------------


def as_fixture(entries: list[dict]) -> dict:
    from importlib.metadata import version

    def name(e: dict) -> str:
        base = e.get("name") or "unnamed"
        body = e.get("body") or ""
        path = urlsplit(e["path"]).path
        if path == "/api/chat":
            try:
                req = json.loads(body)
            except ValueError:
                return f"{base}.chat"
            last = next((m.get("content") for m in reversed(req.get("messages") or [])
                         if m.get("role") == "user"), "") or ""
            text = last if isinstance(last, str) else json.dumps(last)
            if "### Task:" in text:  # Open WebUI's background tasks: title, tags, follow-ups, queries
                task = text.split("### Task:", 1)[1].strip().split("\n", 1)[0].lower()
                for key, label in (("title", "title"), ("tags", "tags"), ("predict", "follow_ups"),
                                   ("follow", "follow_ups"), ("quer", "queries"), ("emoji", "emoji"),
                                   ("autocomplet", "autocomplete")):
                    if key in task:
                        return f"{base}.task.{label}"
                return f"{base}.task." + "_".join(task.split()[:3])
            return f"{base}.message" + (".tools" if req.get("tools") else "")
        return f"{base}.{e['method']}_{path.strip('/').replace('/', '_')}"

    requests = [{"name": name(e), **{k: e.get(k) for k in ("method", "path", "headers", "body")}}
                for e in entries if e["path"] != "/__recorder__/name"]
    return {"client": "openwebui", "package": "open-webui", "version": version("open-webui"),
            "python": platform.python_version(), "recorded_by": "scripts/clients/openwebui_e2e.py",
            "requests": requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(ROOT / ".cache/clients/results/openwebui"))
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds for Open WebUI to come up")
    parser.add_argument("--answer-timeout", type=float, default=300, help="seconds for the answer")
    parser.add_argument("--canned", action="store_true", help="Open WebUI talks to canned answers, not the node")
    parser.add_argument("--upstream", default=None,
                        help="an Ollama-compatible server to use instead of starting a node")
    parser.add_argument("--fixture-from", default=None, metavar="REQUESTS_JSON",
                        help="only rewrite the fixture from a saved requests.json (no servers, no browser)")
    parser.add_argument("--update-fixture", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    args = parser.parse_args(argv)

    if args.fixture_from:
        saved = json.loads(Path(args.fixture_from).read_text())
        FIXTURE.write_text(json.dumps(as_fixture(saved), indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {FIXTURE}")
        return 0
    results = Path(args.results)
    if results.exists():
        shutil.rmtree(results)
    results.mkdir(parents=True)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="meshollama-owui-"))
    outcome: dict = {}
    try:
        node = args.upstream or (None if args.canned else start_node(procs, tmp, results))
        recorder = start_recorder(procs, results, node)
        name_requests(recorder, "openwebui.startup")
        base = start_openwebui(procs, tmp, results, recorder, args.startup_timeout)
        name_requests(recorder, "openwebui.page_load")
        outcome = run_browser(base, results, args.question, args.answer_timeout, recorder)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    entries = json.loads((results / "requests.json").read_text()) if (results / "requests.json").exists() else []
    fixture = as_fixture(entries)
    (results / "openwebui.json").write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n")
    if args.update_fixture:
        FIXTURE.write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n")
        log(f"wrote {FIXTURE}")
    message = outcome.get("message") or {}
    ok = bool(outcome.get("answered") and not message.get("error") and not outcome.get("error_bubbles")
              and (message.get("content") or "").strip() and (outcome.get("shown_answer") or "").strip())
    outcome["ok"] = ok
    outcome["node_requests"] = [
        {"name": e.get("name"), "method": e["method"], "path": e["path"], "status": e.get("status"),
         "answer_head": (e.get("answer_head") or "")[:300]} for e in entries]
    (results / "summary.json").write_text(json.dumps(outcome, indent=2, ensure_ascii=False) + "\n")
    for e in outcome["node_requests"]:
        log(f"  {e['name']}: {e['method']} {e['path']} -> {e['status']}"
            + (f" {e['answer_head'][:160]!r}" if e["status"] != 200 else ""))
    if outcome.get("blocked_requests"):
        log(f"blocked {len(outcome['blocked_requests'])} requests off this machine: {outcome['blocked_requests'][:5]}")
    log(f"answer stored: {message.get('content')!r} error: {message.get('error')!r}")
    log(f"page shows: answer {outcome.get('shown_answer')!r}, error bubbles {outcome.get('error_bubbles')}")
    log(f"screenshot: {results / 'chat.png'}")
    log("PASS" if ok else "FAIL: Open WebUI did not show an answer from the model")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
