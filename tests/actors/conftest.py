import pytest
import structlog

from .harness import formatted, mounted


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "logs_errors: the test provokes failures that the actors log as errors")


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(request):
    """Every actor test runs with its log captured; an error logged where the test did not ask
    for one (marker ``logs_errors``) fails it."""
    with structlog.testing.capture_logs() as events:
        yield events
    if request.node.get_closest_marker("logs_errors") is None:
        errors = [e for e in events if e["log_level"] in ("error", "critical")]
        assert not errors, f"unexpected error logs: {errors}"


@pytest.fixture
def disk():
    """A freshly formatted in-memory disk."""
    return formatted()


@pytest.fixture
async def fs(disk):
    """The actors running on ``disk``; shut down cleanly after the test."""
    async with mounted(disk) as fs:
        yield fs
