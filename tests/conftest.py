"""Shared test fixtures. Every network test uses 127.0.0.1, OS-chosen ports and a deadline."""

from __future__ import annotations


import pytest

from meshollama import logs

logs.setup("warning")


@pytest.fixture
def anyio_backend():
    return "trio"
