"""Shared fixtures for every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT


@pytest.fixture
def repo_root() -> Path:
    return ROOT
