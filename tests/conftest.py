"""Hooks for the whole suite."""

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # trio wraps a Ctrl-C that lands inside a nursery in an exception group, and pytest stops the
    # session only for a bare KeyboardInterrupt: without this, each Ctrl-C failed one test and
    # the run went on.
    try:
        return (yield)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from group
        raise
