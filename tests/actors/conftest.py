import pytest

from .harness import formatted, mounted


@pytest.fixture
def disk():
    """A freshly formatted in-memory disk."""
    return formatted()


@pytest.fixture
async def fs(disk):
    """The actors running on ``disk``; shut down cleanly after the test."""
    async with mounted(disk) as fs:
        yield fs
