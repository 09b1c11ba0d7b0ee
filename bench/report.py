"""Medians, ratios and the tables that bench/run.py prints (markdown, for docs/PERFORMANCE.md).

A ratio is always razorfs's speed over the other's: > 1 means razorfs is faster, whether the
step is measured in seconds (ratio = other's time / razorfs's) or as a rate.
"""

from __future__ import annotations

import json
import os
import statistics

import spy
from common import median
from workloads import REQUEST_KINDS

# step -> (what it is, unit, higher is better)
STEPS = {
    "tree_extract": ("extract the tarball (tar -xf)", "s", False),
    "tree_cp": ("cp -a of the tree", "s", False),
    "tree_grep_cold": ("grep -r, cold cache", "s", False),
    "tree_find_stat": ("find -exec stat {} +", "s", False),
    "tree_rm": ("rm -rf of the tree", "s", False),
    "fio_randwrite_1": ("4 KiB random write + fsync, 1 job", "IOPS", True),
    "fio_randwrite_4": ("same, 4 jobs", "IOPS", True),
    "fio_seq_write": ("sequential write 1 MiB, end fsync", "MiB/s", True),
    "fio_seq_read": ("sequential read 1 MiB, cold cache", "MiB/s", True),
    "append": ("tiny O_APPEND writes (16 B)", "writes/s", True),
    "fs_mark_nosync": ("fs_mark 4 KiB files, no fsync", "files/s", True),
    "fs_mark_fsync": ("fs_mark 4 KiB files, fsync", "files/s", True),
    "dbench": ("dbench, 4 clients", "MB/s", True),
}
# issue 14: (step, least ratio razorfs / C)
TARGETS = {"tree_extract": 0.5, "tree_cp": 0.5, "tree_grep_cold": 0.5, "tree_find_stat": 0.5,
           "tree_rm": 0.5, "fio_randwrite_1": 0.5, "fio_randwrite_4": 0.5,
           "fio_seq_write": 0.8, "fio_seq_read": 0.9}
FLOOR_FACTOR = 2.0  # razorfs's daemon CPU per request at most 2x the floor's


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians per target and step, the ratios, the targets and the per-request figures."""
    medians, ranges = {}, {}
    for kind, suite_runs in runs.items():
        values = _collect(suite_runs, lambda step: step.get("value"))
        medians[kind] = {name: median(v) for name, v in values.items()}
        ranges[kind] = {name: [min(v), max(v)] for name, v in values.items()}
    ratios = {other: {name: _speed_ratio(name, medians["razorfs"].get(name),
                                         medians.get(other, {}).get(name))
                      for name in medians.get("razorfs", {})}
              for other in ("C", "plain")}
    targets = []
    for name, least in TARGETS.items():
        ratio = ratios["C"].get(name)
        targets.append({"step": name, "least": least, "ratio": ratio,
                        "met": None if ratio is None else ratio >= least})
    per_request = {kind: _per_request(runs, kind) for kind in REQUEST_KINDS}
    for kind, row in per_request.items():
        cpu, floor = row.get("razorfs_cpu_us"), row.get("floor_cpu_us")
        row["ratio"] = cpu / floor if cpu and floor else None
        targets.append({"step": f"req_{kind}", "most": FLOOR_FACTOR, "ratio": row["ratio"],
                        "met": None if row["ratio"] is None else row["ratio"] <= FLOOR_FACTOR})
    return {"medians": medians, "ranges": ranges, "ratios": ratios, "targets": targets,
            "per_request": per_request, "razorfs_steps": _razorfs_counters(runs)}


def _collect(suite_runs: list[dict], pick) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for run in suite_runs:
        for name, step in run["steps"].items():
            value = pick(step)
            if value is not None:
                values.setdefault(name, []).append(value)
    return values


def _speed_ratio(name: str, razorfs: float | None, other: float | None) -> float | None:
    if not razorfs or not other:
        return None
    higher_is_better = STEPS.get(name, ("", "", True))[2]
    return razorfs / other if higher_is_better else other / razorfs


def _per_request(runs: dict[str, list[dict]], kind: str) -> dict:
    """Daemon CPU per request of ``kind`` (razorfs, floor: counted by the daemon), per loop
    iteration (C: it counts nothing), wall time per iteration, and the requests per
    iteration that came with it."""
    name = f"req_{kind}"
    row: dict = {}
    for target, suite_runs in runs.items():
        steps = [run["steps"][name] for run in suite_runs if name in run["steps"]]
        if not steps:
            continue
        row[f"{target}_wall_us"] = median([s["seconds"] / s["count"] * 1e6 for s in steps])
        counted = [s for s in steps if s.get("requests", {}).get(kind) and "cpu" in s]
        if counted:
            row[f"{target}_cpu_us"] = median([s["cpu"] / s["requests"][kind] * 1e6
                                              for s in counted])
            mix = {op: median([s["requests"].get(op, 0) / s["count"] for s in counted])
                   for op in counted[0]["requests"] if not op.startswith("wal.")}
            row[f"{target}_mix"] = {op: round(n, 2) for op, n in mix.items() if n >= 0.01}
        elif all("cpu" in s for s in steps):
            row[f"{target}_cpu_us_per_op"] = median([s["cpu"] / s["count"] * 1e6
                                                     for s in steps])
    return row


def _razorfs_counters(runs: dict[str, list[dict]]) -> dict:
    rows = {}
    for name in {n for run in runs.get("razorfs", []) for n in run["steps"]}:
        steps = [run["steps"][name] for run in runs["razorfs"] if name in run["steps"]]
        row = {"cores": median([s["cpu"] / s["seconds"] for s in steps if "cpu" in s]),
               "main_thread": median([s["main_cpu"] / s["seconds"] for s in steps
                                      if "main_cpu" in s])}
        with_requests = [s for s in steps if "requests" in s and "cpu" in s]
        totals = [sum(n for op, n in s["requests"].items() if not op.startswith("wal."))
                  for s in with_requests]
        row["requests"] = median(totals)
        row["cpu_us_per_request"] = median([s["cpu"] / t * 1e6
                                            for s, t in zip(with_requests, totals) if t])
        commits = [s["requests"] for s in with_requests if s["requests"].get("wal.commits")]
        row["records_per_commit"] = median([r.get("wal.records", 0) / r["wal.commits"]
                                            for r in commits])
        row["fsyncs_per_record"] = median([r.get("wal.fsyncs", 0) / r["wal.records"]
                                           for r in commits if r.get("wal.records")])
        rows[name] = row
    return rows


# ---------------------------------------------------------------- tables

def _number(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "–"
    if digits is None:
        digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}"


def _verdict(met: bool | None) -> str:
    return {None: "?", True: "met", False: "**not met**"}[met]


def main_table(summary: dict) -> str:
    medians, ratios = summary["medians"], summary["ratios"]
    targets = {t["step"]: t for t in summary["targets"]}
    lines = ["| work | unit | razorfs | C passthrough_hp | plain (ext4) | razorfs / C | target "
             "| | razorfs / plain |", "|---|---|---|---|---|---|---|---|---|"]
    ordered = [s for s in STEPS if s in TARGETS] + [s for s in STEPS if s not in TARGETS]
    for name in ordered:
        if not any(name in medians.get(kind, {}) for kind in ("razorfs", "C", "plain")):
            continue
        what, unit, _ = STEPS[name]
        target = targets.get(name)
        least = f"≥ {target['least']}" if target else ""
        lines.append(
            f"| {what} | {unit} | {_number(medians.get('razorfs', {}).get(name))} "
            f"| {_number(medians.get('C', {}).get(name))} "
            f"| {_number(medians.get('plain', {}).get(name))} "
            f"| {_number(ratios['C'].get(name), 2)} "
            f"| {least} "
            f"| {_verdict(target['met']) if target else ''} "
            f"| {_number(ratios['plain'].get(name), 3)} |")
    group = {kind: values.get("fio_randwrite_4", 0) / values["fio_randwrite_1"]
             for kind, values in medians.items() if values.get("fio_randwrite_1")}
    if group.get("razorfs"):
        lines.append(f"| group commit: random write + fsync, 4 jobs / 1 job | × "
                     f"| {_number(group.get('razorfs'), 2)} | {_number(group.get('C'), 2)} "
                     f"| {_number(group.get('plain'), 2)} | | | | |")
    return "\n".join(lines)


def request_table(summary: dict) -> str:
    lines = ["| request | razorfs CPU µs / request | floor CPU µs / request | razorfs / floor "
             "| target | | requests per loop (razorfs) | wall µs per loop: razorfs / floor / C "
             "/ plain | C CPU µs per loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    targets = {t["step"]: t for t in summary["targets"]}
    for kind, row in summary["per_request"].items():
        if not row:
            continue
        mix = ", ".join(f"{n:g} {op}" for op, n in sorted(row.get("razorfs_mix", {}).items(),
                                                          key=lambda item: -item[1]))
        walls = " / ".join(_number(row.get(f"{t}_wall_us"))
                           for t in ("razorfs", "floor", "C", "plain"))
        lines.append(f"| {kind} | {_number(row.get('razorfs_cpu_us'))} "
                     f"| {_number(row.get('floor_cpu_us'))} | {_number(row.get('ratio'), 2)} "
                     f"| ≤ {FLOOR_FACTOR:g}× | {_verdict(targets[f'req_{kind}']['met'])} "
                     f"| {mix} | {walls} | {_number(row.get('C_cpu_us_per_op'))} |")
    return "\n".join(lines)


def counters_table(summary: dict) -> str:
    lines = ["| step | razorfs daemon (cores) | main thread (cores) | FUSE requests "
             "| CPU µs / request | WAL records / commit | disk fsyncs / record |",
             "|---|---|---|---|---|---|---|"]
    order = list(STEPS) + [f"req_{kind}" for kind in REQUEST_KINDS]
    for name in order:
        row = summary["razorfs_steps"].get(name)
        if row:
            lines.append(f"| {name} | {_number(row['cores'], 2)} "
                         f"| {_number(row['main_thread'], 2)} | {_number(row['requests'], 0)} "
                         f"| {_number(row['cpu_us_per_request'])} "
                         f"| {_number(row['records_per_commit'])} "
                         f"| {_number(row['fsyncs_per_record'], 2)} |")
    return "\n".join(lines)


def load_line(runs: dict[str, list[dict]]) -> str:
    loads = [step["load"] for suite_runs in runs.values() for run in suite_runs
             for step in run["steps"].values()]
    if not loads:
        return "load average: no step ran"
    return (f"1-minute load average at the start of each step: median "
            f"{statistics.median(loads):.2f}, range {min(loads):.2f}–{max(loads):.2f}")


def publish(runs: dict[str, list[dict]], context: dict, tools, profiler, json_path: str) -> bool:
    """Print the tables, what was skipped and what failed; write everything to ``json_path``.
    Whether anything failed."""
    summary = summarise(runs)
    version, machine = context["razorfs"], context["machine"]
    changed = f" + {len(version['changed_files'])} changed file(s)" * bool(
        version["changed_files"])
    print(f"razorfs {version['commit']}{changed}; {' '.join(context['command'][1:]) or '-'}; "
          f"{machine['nproc']} CPUs, kernel {machine['kernel']}, {' '.join(machine['df_T'])}; "
          f"medians of {context['repeat']}; {context['elapsed_seconds']:.0f} s; "
          f"{load_line(runs)}")
    print(f"tools: {', '.join(f'{k} {v}' for k, v in tools.versions.items()) or 'none'}\n")
    print(main_table(summary) + "\n")
    print(request_table(summary) + "\n")
    print(counters_table(summary))
    profiles = {step: spy.summarise(paths) for step, paths in
                (profiler.files.items() if profiler else [])}
    for step, profile in profiles.items():
        print("\n" + spy.format_profile(step, profile))
    if profiles:
        print("\nthe trio thread's CPU per loop iteration, split by trio task in the "
              "proportions of py-spy's samples:\n" + spy.compact_table(profiles, runs))
    for name, reason in tools.missing.items():
        print(f"skipped ({name}): {reason}")
    errors = {f"{kind}/{name}": message for kind, suite_runs in runs.items()
              for run in suite_runs for name, message in run["errors"].items()}
    for where, message in errors.items():
        print(f"error {where}: {message}")
    for kind, suite_runs in runs.items():
        problems = [line for run in suite_runs for line in run["daemon_log_problems"]]
        if problems:
            print(f"{kind}: {len(problems)} warning/error line(s) from the daemon or its "
                  f"unmount, e.g. {problems[0][:300]}")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as out:
            json.dump({**context, "tools": tools.versions, "skipped": tools.missing,
                       "errors": errors, "profiles": profiles, **summary, "runs": runs},
                      out, indent=1)
        print(f"\nresults: {json_path}")
    if context["quick"]:  # a smoke run needs no anchor: its errors are printed, not fatal
        return any(not where.startswith("C/") for where in errors)
    return bool(errors)
