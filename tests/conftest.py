"""Shared fixtures. The helpers they hand out live in tests/helpers/ (import those directly, never conftest)."""

from __future__ import annotations

import pytest

from privatune.common.offline import set_offline_env
from tests.helpers.messages import make_context, make_message

set_offline_env()


@pytest.fixture
def message_factory():
    return make_message


@pytest.fixture
def context_factory():
    return make_context
