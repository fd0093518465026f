"""The Hugging Face offline switches, in one place: privatune's models load from installed packages and must
never reach a model hub (a site may have no network at all). Shell scripts and CI keep their own exports."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType

#: The environment variables that keep huggingface_hub and transformers off the network.
OFFLINE_ENV: Mapping[str, str] = MappingProxyType({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def set_offline_env(*, force: bool = False) -> None:
    """Set OFFLINE_ENV in this process; ``force`` overrides values already set, otherwise they are kept."""
    for name, value in OFFLINE_ENV.items():
        if force:
            os.environ[name] = value
        else:
            os.environ.setdefault(name, value)
