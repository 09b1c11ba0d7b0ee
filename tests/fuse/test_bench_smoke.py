"""The benchmark scripts, run at toy sizes so that they cannot rot. Nothing here looks at speed:
only that each script runs to the end against real mounts and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCH / name), *args], check=False,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_suite_quick_python_probes(tmp_path):
    results = tmp_path / "suite.json"
    output = run_script("run.py", "--quick", "--only", "python", "--no-install",
                        "--workdir", str(tmp_path / "work"), "--json", str(results)).stdout
    assert "creates" in output and "rand_fsync_8" in output
    report = json.loads(results.read_text())
    assert not report["errors"]
    for probe in ("creates", "stat", "seq_write", "seq_read", "rand_fsync_1", "rand_fsync_8"):
        assert report["medians"]["razorfs"][probe] > 0
        assert report["medians"]["plain"][probe] > 0


def test_scale_tiny(tmp_path):
    results = tmp_path / "scale.json"
    run_script("scale.py", "--files", "2000", "--per-dir", "200", "--big-dir", "500",
               "--wal-records", "1000", "--samples", "100", "--checkpoints", "1",
               "--workdir", str(tmp_path / "work"), "--json", str(results))
    report = json.loads(results.read_text())
    assert not report["error"]
    assert report["results"]["mount_replay"]["replayed"] == 1000


def test_crash_mount_tiny(tmp_path):
    output = run_script("crash_mount.py", "--files", "3000", "--records", "700", "--runs", "1",
                        "--workdir", str(tmp_path)).stdout
    assert "700 records replayed, 3,004 inodes" in output  # 3 directories and the root
    assert "mount after a crash, 3,000 files + 700 records: median" in output
