"""Fixtures for tests across hosts (network namespaces); they skip, naming
what is missing, where namespaces cannot be made."""

from __future__ import annotations

import pytest

from tests.netns import Net, missing

pytestmark = pytest.mark.slow


@pytest.fixture
def net():
    why = missing()
    if why:
        pytest.skip(why)
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def nat_net():
    why = missing(nat=True)
    if why:
        pytest.skip(why)
    n = Net()
    try:
        yield n
    finally:
        n.close()
