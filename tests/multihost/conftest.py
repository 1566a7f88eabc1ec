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


def _hosts(*, nat: bool):
    _need(missing(nat=nat))
    sweep()
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def net():
    """Namespace hosts on bridges (``ip``)."""
    yield from _hosts(nat=False)


@pytest.fixture
def nat_net():
    """The same, and NAT routers (``nft``)."""
    yield from _hosts(nat=True)
