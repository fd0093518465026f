"""Shared fixtures. The helpers they hand out live in tests/helpers/ (import those directly, never conftest)."""

from __future__ import annotations

import os

import pytest

from tests.helpers.messages import make_context, make_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def message_factory():
    return make_message


@pytest.fixture
def context_factory():
    return make_context
