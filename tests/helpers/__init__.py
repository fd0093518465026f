"""Helpers the tests import (messages and contexts, ledgers as older versions wrote them, audit fixtures)."""
