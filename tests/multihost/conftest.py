"""Fixtures for tests across hosts (network namespaces); they skip, naming
what is missing, where namespaces cannot be made."""

from __future__ import annotations

import os

import pytest

from tests.netns import Net, missing, sweep


def _need(why: str | None) -> None:
    if why and os.environ.get("CI"):
        pytest.fail(f"CI must run the multi-host tests: {why}")  # the install step provides them
    if why:
        pytest.skip(why)


@pytest.fixture
def net():
    _need(missing())
    sweep()
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def nat_net():
    _need(missing(nat=True))
    sweep()
    n = Net()
    try:
        yield n
    finally:
        n.close()
