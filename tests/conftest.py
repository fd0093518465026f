"""Shared fixtures. The helpers they hand out live in tests/helpers/ (import those directly, never conftest)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from privatune.common.offline import set_offline_env
from tests.helpers.messages import make_context, make_message

set_offline_env()

# The feature cache defaults to the user's cache folder ($XDG_CACHE_HOME/privatune, else ~/.cache/privatune): every
# test, and every simulation a test starts (they inherit the environment), uses a session folder instead, so no test
# writes to HOME (tests/test_flwr_run.py asserts it stays empty) or reads a cache the user's own runs left.
_TEST_CACHE_HOME = tempfile.mkdtemp(prefix="privatune-test-cache-")
os.environ["XDG_CACHE_HOME"] = _TEST_CACHE_HOME


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TEST_CACHE_HOME, ignore_errors=True)


@pytest.fixture
def message_factory():
    return make_message


@pytest.fixture
def context_factory():
    return make_context
