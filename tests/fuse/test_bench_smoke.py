"""The benchmark scripts, run at toy sizes so that they cannot rot. Nothing here looks at speed:
only that each script runs to the end against real mounts and reports what it measured."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

BENCH = Path(__file__).resolve().parents[2] / "bench"
REQUEST_KINDS = ("create", "unlink", "mkdir", "rename", "setattr", "write", "fsync", "read")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCH / name), *args], check=False,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_suite_quick(tmp_path):
    """No network and no anchor needed: the tree is generated, the C column is there only if
    bench/tools.py built passthrough_hp before, and missing tools are skipped."""
    results = tmp_path / "suite.json"
    output = run_script("run.py", "--quick", "--no-install", "--only", "tree,requests,append",
                        "--workdir", str(tmp_path / "work"), "--json", str(results)).stdout
    report = json.loads(results.read_text())
    assert not [where for where in report["errors"] if not where.startswith("C/")]
    for step in ("tree_extract", "tree_cp", "tree_grep_cold", "tree_find_stat", "tree_rm",
                 "append"):
        assert report["medians"]["razorfs"][step] > 0
        assert report["medians"]["plain"][step] > 0
        assert report["ratios"]["plain"][step] > 0
    # a ratio is razorfs's speed over the other's: for a time, the other's time over razorfs's
    medians = report["medians"]
    assert report["ratios"]["plain"]["tree_rm"] == pytest.approx(
        medians["plain"]["tree_rm"] / medians["razorfs"]["tree_rm"])
    assert report["ratios"]["plain"]["append"] == pytest.approx(
        medians["razorfs"]["append"] / medians["plain"]["append"])
    if "anchor" in report["skipped"]:  # not built: no C column, and no failure for it
        assert "C" not in report["medians"]
    elif not report["errors"]:
        assert report["ratios"]["C"]["tree_extract"] > 0
    for kind in REQUEST_KINDS:
        row = report["per_request"][kind]
        assert row["razorfs_cpu_us"] > 0 and row["floor_cpu_us"] > 0, (kind, row)
        # each daemon counted the loop's requests of that kind itself
        assert row["razorfs_mix"][kind] == 1 and row["floor_mix"][kind] == 1, (kind, row)
        assert f"| {kind} |" in output
    assert report["per_request"]["create"]["razorfs_mix"]["lookup"] == 1
    # unlink and rename run with the dentry cache dropped: every name is looked up again
    for target in ("razorfs", "floor"):
        assert report["per_request"]["unlink"][f"{target}_mix"]["lookup"] == pytest.approx(
            1, abs=0.05)
    verdicts = {t["step"]: t["met"] for t in report["targets"]}
    assert set(verdicts) >= {f"req_{kind}" for kind in REQUEST_KINDS} | {"tree_rm"}
    for kind in REQUEST_KINDS:
        row = report["per_request"][kind]
        assert row["ratio"] == pytest.approx(row["razorfs_cpu_us"] / row["floor_cpu_us"])
        assert verdicts[f"req_{kind}"] == (row["ratio"] <= 2)


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


def test_checkpoint_stall_tiny(tmp_path):
    output = run_script("checkpoint_stall.py", "--inodes", "3000", "--runs", "1",
                        "--workdir", str(tmp_path)).stdout
    assert "no checkpoint" in output and "longest tree manager step" in output
    assert output.count("checkpoint 1 ") == 1


def test_quick_run_survives_a_broken_anchor(tmp_path):
    """--quick never fails for the anchor: one that cannot mount is reported, not fatal."""
    spec = importlib.util.spec_from_file_location("bench_tools", BENCH / "tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    version = tools._dpkg_version("libfuse3-dev")
    if not version:
        pytest.skip("libfuse3-dev is not installed")
    cache = tmp_path / "cache"
    cache.mkdir()
    recipe = hashlib.sha256(" ".join(tools.ANCHOR_BUILD).encode()).hexdigest()[:8]
    fake = cache / f"passthrough_hp-{version}-{recipe}"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    results = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--no-install", "--only", "append",
         "--targets", "C,plain", "--workdir", str(tmp_path / "work"), "--json", str(results)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAZORFS_BENCH_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(results.read_text())
    assert "exited with 3 before mounting" in report["errors"]["C/mount"]
    assert report["medians"]["plain"]["append"] > 0


def test_nonowner_access_tiny():
    output = run_script("nonowner_access.py", "--files", "50", "--rounds", "2").stdout
    assert "100 opens + reads as uid 1000: razorfs" in output
    requests = dict(item.split() for item in output.split("during the reads: ")[1].split(", "))
    assert int(requests["getxattr"]) >= 50  # each file's ACL, asked for by the kernel
