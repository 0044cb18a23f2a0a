"""Fixtures of the fault tier; the campaign itself is in campaign.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from campaign import CAMPAIGN, Campaign, report


@pytest.fixture(scope="session")
def campaign() -> Iterator[Campaign]:
    """Return the session's campaign; print its table when the session ends."""
    yield CAMPAIGN
    report()
