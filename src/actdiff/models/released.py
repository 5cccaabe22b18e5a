"""The released nomic-embed-text-v2-moe config.json, shipped as package data."""

from __future__ import annotations

import json
from importlib import resources


def released_config() -> dict:
    return json.loads(resources.files("actdiff").joinpath("data/nomic-embed-text-v2-moe.config.json").read_text())
