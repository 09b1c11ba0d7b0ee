"""razorfs at the FUSE limit (issue 14): everyday work on razorfs, on libfuse's C
passthrough_hp over a directory of the same disk, and on a plain directory of that disk, in one
run; per request kind, razorfs's daemon CPU against a pyfuse3 filesystem that does nothing.

    .venv/bin/python bench/run.py                     # everything, medians of 3
    .venv/bin/python bench/run.py --quick             # smoke run: tiny sizes, 1 repetition
    .venv/bin/python bench/run.py --only tree,requests --repeat 5
    .venv/bin/python bench/run.py --only requests --targets razorfs,floor --profile req_

Run as root (drops caches, mounts). Tools come from bench/tools.py (Debian's fio, fsmark,
dbench; passthrough_hp built from Debian's fuse3 source; the git source tarball for the trees);
--no-install skips what is missing instead, and --quick uses a small generated tree, so a smoke
run needs no network and no anchor. --profile runs py-spy on razorfs and the floor during the
named steps (prefixes) and prints where their trio thread's time goes, by task. Each repetition mounts every target afresh and runs the
workloads on each in turn (the order rotates between repetitions); the floor runs only the
per-request loops. Results, every run's steps with their load average, the daemons' CPU and
razorfs's request and WAL counters, go to --json.

Workloads (--only): tree (extract, cp -a, cold grep -r, find -exec stat, rm -rf of ~4,500
entries), requests (5,000 of each kind: create, unlink and rename after dropping the dentry
cache, mkdir; at most 5 s each of setattr by futimens, 4 KiB write, 4 KiB write + fsync, 4 KiB
O_DIRECT read),
append (100,000 writes of 16 B with O_APPEND), fio (sequential 1 MiB write with end fsync of
256 MiB, its cold read, 4 KiB random write + fsync for 10 s with 1 and 4 jobs), fs_mark (5,000
4 KiB files without fsync, 2,000 with), dbench (4 clients, 10 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import report
import spy
import workloads
from common import (Anchor, BENCH_DIR, Floor, MiB, Plain, Razorfs, log, machine_info,
                    razorfs_version)
from tools import Tools

WORKLOADS = {"tree": workloads.tree, "requests": workloads.requests,
             "append": workloads.append, "fio": workloads.fio, "fs_mark": workloads.fs_mark,
             "dbench": workloads.dbench}
NEEDS = {"fio": "fio", "fs_mark": "fs_mark", "dbench": "dbench"}  # workload -> tool


def sizes_for(quick: bool, tools: Tools, workdir: str) -> workloads.Sizes:
    if quick:
        tarball = workloads.make_small_tarball(os.path.join(workdir, "small-tree.tar"))
        return workloads.Sizes(tarball, requests=100, request_seconds=0.5, appends=1_000,
                               fio_size=16 * MiB, fio_rand_size=4 * MiB, fio_runtime=1,
                               fs_mark_files=200, fs_mark_files_sync=100, dbench_seconds=2)
    return workloads.Sizes(tools.tree_tarball(), requests=5_000, request_seconds=5,
                           appends=100_000, fio_size=256 * MiB, fio_rand_size=64 * MiB,
                           fio_runtime=10, fs_mark_files=5_000, fs_mark_files_sync=2_000,
                           dbench_seconds=10)


def run_target(target, chosen: list[str], sizes, tools, profiler) -> dict:
    meter = workloads.Meter(target, profiler)
    errors = {}
    try:
        with target as root:
            for name in chosen:
                try:
                    WORKLOADS[name](meter, root, sizes, tools)
                except Exception as exc:  # one failing workload must not lose the others
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    log(f"{target.kind} {name} FAILED: {errors[name]}")
    except Exception as exc:  # mounting or unmounting: the other targets still run
        errors["mount"] = f"{type(exc).__name__}: {exc}"
        log(f"{target.kind} FAILED: {errors['mount']}")
    return {"steps": meter.steps, "errors": errors,
            "daemon_log_problems": getattr(target, "log_problems", [])}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="workloads, comma-separated")
    parser.add_argument("--targets", default="razorfs,C,plain,floor")
    parser.add_argument("--workdir", help="where to work (default: new in /var/tmp)")
    parser.add_argument("--json", default=os.path.join(BENCH_DIR, "results", "latest.json"))
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="skip what is not installed instead of installing it")
    parser.add_argument("--profile", default="", help="py-spy razorfs during these steps "
                        "(names or prefixes, comma-separated)")
    args = parser.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    return args


def main() -> int:
    args = arguments()
    tools = Tools(args.install)
    workdir = args.workdir or tempfile.mkdtemp(prefix="razorfs-bench-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    sizes = sizes_for(args.quick, tools, workdir)
    chosen = [w for w in WORKLOADS if w in args.only.split(",")
              and (w != "tree" or sizes.tarball) and (w not in NEEDS or tools.binary(NEEDS[w]))]
    kinds = args.targets.split(",")
    anchor = tools.anchor() if "C" in kinds else None
    profiler = (spy.Profiler(args.profile.split(","), os.path.join(BENCH_DIR, "results",
                                                                   "profiles"))
                if args.profile else None)
    context = {"command": sys.argv, "repeat": args.repeat, "quick": args.quick,
               "razorfs": razorfs_version(), "machine": machine_info(workdir)}
    started = time.time()

    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for repetition in range(args.repeat):
        targets = {"razorfs": Razorfs(workdir), "plain": Plain(workdir), "floor": Floor(workdir),
                   "C": Anchor(workdir, anchor) if anchor else None}
        order = [kind for kind in kinds if targets.get(kind)]
        order = order[repetition % len(order):] + order[:repetition % len(order)]
        for kind in order:  # rotated: no target always runs first, or last
            log(f"repetition {repetition + 1}/{args.repeat}: {kind}")
            mine = [w for w in chosen if kind != "floor" or w == "requests"]
            runs[kind].append(run_target(targets[kind], mine, sizes, tools, profiler))

    context["elapsed_seconds"] = round(time.time() - started, 1)
    failed = report.publish({k: v for k, v in runs.items() if v}, context, tools, profiler,
                            args.json)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
