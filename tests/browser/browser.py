"""Playwright's sync API on one thread of its own, for tests that run on trio.

Playwright's async API needs asyncio and the suite runs on trio, and its sync
API must be used from the thread that started it: :class:`Browser` owns one
worker thread, and every call on a page goes through :meth:`Browser.run`,
which trio awaits in a thread of its own (``trio.to_thread``). Every
Playwright call has a timeout, so nothing waits for ever.

The system Chromium is used (``apt-get install chromium``); Playwright's own
browser download is never needed.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import trio

# Read once at import: the tests then take it out of the environment, because a node
# refuses to start with a MESHOLLAMA_* variable it does not know.
SCREENSHOTS_ENV = "MESHOLLAMA_SCREENSHOTS"
SCREENSHOTS = os.environ.get(SCREENSHOTS_ENV, "")
TIMEOUT_MS = 20_000
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1366, "height": 900}


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs playwright (pip install -e '.[test]')"
    if shutil.which("chromium") is None:
        return "needs chromium (apt-get install chromium)"
    return None


class Browser:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")
        self._pw: Any = None
        self.browser: Any = None

    def start(self) -> None:
        self._thread.submit(self._start).result(timeout=60)

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])

    def close(self) -> None:
        def stop() -> None:
            try:
                if self.browser is not None:
                    self.browser.close()
            finally:
                if self._pw is not None:
                    self._pw.stop()

        try:
            self._thread.submit(stop).result(timeout=30)
        finally:
            self._thread.shutdown(wait=False)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the browser's thread; trio waits for it in another thread."""
        future = self._thread.submit(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(future.result)

    async def page(self, url: str, viewport: dict = LAPTOP) -> Any:
        """A fresh context (its own sessionStorage) and page at ``url``; console errors are kept."""
        def open_page() -> Any:
            context = self.browser.new_context(viewport=viewport)
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            page.errors = []
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
            page.goto(url)
            return page

        return await self.run(open_page)


def screenshot_dir(tmp_path: Path) -> Path:
    """``$MESHOLLAMA_SCREENSHOTS`` when set (e.g. docs/img), else the test's own tmp dir."""
    target = Path(SCREENSHOTS or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


async def screenshot(browser: Browser, page: Any, tmp_path: Path, name: str) -> Path:
    path = screenshot_dir(tmp_path) / f"panel-{name}.png"
    await browser.run(lambda: page.screenshot(path=str(path), full_page=True, animations="disabled"))
    return path
