"""Browser tests of the web panel (Playwright driving the system Chromium)."""
