"""Whom a registry trusts with heartbeats and catalogue reads: nobody unless told, never anyone by accident."""

from __future__ import annotations

import pytest

from toolmesh.registry.settings import RegistrySettings
from toolmesh.registry.auth import anyone, shared_secret


async def test_a_registry_told_nothing_trusts_nobody():
    verdict = await RegistrySettings().auth("Bearer anything")
    assert not verdict.allowed and "no heartbeat credential" in verdict.reason
    assert not (await RegistrySettings().auth(None)).allowed


async def test_an_empty_secret_is_refused_rather_than_taken_for_none():
    with pytest.raises(ValueError):
        shared_secret("")
    check = shared_secret("s3cret")
    assert (await check("Bearer s3cret")).allowed
    assert not (await check("Bearer s3cre")).allowed
    assert not (await check(None)).allowed


async def test_only_insecure_mode_accepts_anyone():
    assert (await anyone(None)).allowed
