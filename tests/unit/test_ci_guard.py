"""Under CI, a test that cannot run must fail, not skip: a skip there hides whatever it tests.

The suites that need real FUSE mounts (and loop devices) are run in a child pytest with CI set
and FUSE pretended missing (RAZORFS_PRETEND_NO_FUSE); one test of each module per distinct set
of fixtures and marks is enough to meet every fixture that could skip, a module-scoped one
included (those run before the autouse guard of tests/fuse/conftest.py). Every test must end
failed or in error (or xfailed: an expected failure absorbs an error in its set-up too); only
the long variants may skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (tests/crash/test_kill9_rounds.py and test_corruption.py skip only outside CI: not here)
NEEDS_FUSE = ["tests/fuse", "tests/crash/test_ext4_power_cut.py"]
ONE_PER_FIXTURE_SET = '''
def pytest_collection_modifyitems(config, items):
    seen, kept, dropped = set(), [], []
    for item in items:
        key = (item.nodeid.split("::")[0], tuple(sorted(getattr(item, "fixturenames", ()))),
               tuple(sorted(mark.name for mark in item.iter_markers())))
        (dropped if key in seen else kept).append(item)
        seen.add(key)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)
'''


@pytest.mark.timeout(600)
def test_no_test_skips_in_ci_for_want_of_fuse(tmp_path):
    (tmp_path / "one_per_fixture_set.py").write_text(ONE_PER_FIXTURE_SET)
    env = dict(os.environ, CI="true", RAZORFS_PRETEND_NO_FUSE="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAZORFS_LONG", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "one_per_fixture_set", "--tb=no", "-rsfE", *NEEDS_FUSE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ (failed|error)", summary), run.stdout[-3000:]
    skips = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    hidden = [line for line in skips if "RAZORFS_LONG" not in line]
    assert not hidden, "tests that would skip in CI instead of failing:\n" + "\n".join(hidden)
    assert " passed" not in summary, f"tests passed without FUSE: {summary}"
