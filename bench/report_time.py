"""Where a workflow run's time went, per rule family (issue 19: "the time per rule family").

    .venv/bin/python bench/report_time.py [--results results] [--snakemake-log .snakemake/log/<run>.log] [--json F]

Every rule's adapter ends its log with one "job cost:" line (actdiff.workflow_support.job_cost_line): the job's
wall seconds since its process started (imports included), the CPU seconds of the process and of the children it
waited for, its peak RSS, the system seconds of that CPU and the minor page faults. This script sums those lines
over ``<results>/logs`` per rule and prints jobs, CPU seconds, their share of the run's CPU, mean and largest per
job, the system seconds and page faults (thousands; "-" where a job's line predates them), summed job wall time
and peak RSS. With the
Snakemake log of the run it also prints the run's wall time (first to last timestamp) and the CPU the jobs used
per second of it (2.0 = both cores busy on a 2-core machine).

A rule whose jobs wrote no "job cost:" line (a log from before the line existed, or a job that failed) is counted
under "jobs without a cost line", so a partial sum never passes for a whole one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from actdiff.workflow_support import parse_job_cost  # noqa: E402

STAMP_RE = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")


def job_costs(logs: Path) -> tuple[list[dict], list[str]]:
    """(one dict per job that logged its cost, the log files that did not)."""
    jobs, missing = [], []
    for log in sorted(logs.rglob("*.log")):
        cost = parse_job_cost(log.read_text(errors="replace"))
        if cost is None:
            missing.append(str(log.relative_to(logs)))
            continue
        jobs.append({k: cost[k] for k in ("rule", "wall_s", "cpu_s", "max_rss_mb", "sys_s", "minflt")})
    return jobs, missing


def per_rule(jobs: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for j in jobs:
        groups[j["rule"]].append(j)
    total_cpu = sum(j["cpu_s"] for j in jobs) or 1.0
    rows = []
    for rule, js in groups.items():
        cpu = [j["cpu_s"] for j in js]
        rows.append({
            "rule": rule, "jobs": len(js), "cpu_s": sum(cpu), "cpu_share": sum(cpu) / total_cpu,
            "cpu_s_mean": sum(cpu) / len(js), "cpu_s_max": max(cpu), "wall_s_sum": sum(j["wall_s"] for j in js),
            "max_rss_mb": max(j["max_rss_mb"] for j in js), "sys_s": _sum_known(js, "sys_s"),
            "minflt": _sum_known(js, "minflt"),
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["cpu_s"])


def _sum_known(js: list[dict], key: str):
    """The jobs' sum of ``key``, or None where a job's cost line predates it (a partial sum would pass for a whole)."""
    values = [j.get(key) for j in js]
    return None if any(v is None for v in values) else sum(values)


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    """``v / scale`` formatted by ``spec``, "-" where ``v`` is None (not logged)."""
    return "-" if v is None else format(v / scale, spec)


def run_wall_s(snakemake_log: Path) -> float | None:
    """First to last bracketed timestamp of a Snakemake run log."""
    stamps = [STAMP_RE.match(line) for line in snakemake_log.read_text(errors="replace").splitlines()]
    times = [datetime.strptime(m[1], "%a %b %d %H:%M:%S %Y") for m in stamps if m]
    return (times[-1] - times[0]).total_seconds() if len(times) >= 2 else None


def print_table(rows: list[dict], missing: list[str], wall: float | None) -> None:
    print("| rule | jobs | CPU s | share | CPU s / job (mean, max) | of it system s | minor faults (k) "
          "| job wall s (sum) | peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['jobs']} | {r['cpu_s']:.1f} | {100 * r['cpu_share']:.1f} % | "
              f"{r['cpu_s_mean']:.1f}, {r['cpu_s_max']:.1f} | {_fmt(r['sys_s'], '.1f')} | "
              f"{_fmt(r['minflt'], '.0f', 1000)} | {r['wall_s_sum']:.0f} | "
              f"{r['max_rss_mb']} |")  # fmt: skip
    cpu = sum(r["cpu_s"] for r in rows)
    wall_sum = sum(r["wall_s_sum"] for r in rows)
    sys_s, faults = _sum_known(rows, "sys_s"), _sum_known(rows, "minflt")
    print(f"| all | {sum(r['jobs'] for r in rows)} | {cpu:.1f} | 100 % | | {_fmt(sys_s, '.1f')} | "
          f"{_fmt(faults, '.0f', 1000)} | {wall_sum:.0f} | |")  # fmt: skip
    if missing:
        print(f"\njobs without a cost line: {len(missing)} (e.g. {missing[:3]})")
    if wall:
        print(f"\nrun wall time {wall:.0f} s; the jobs used {cpu / wall:.2f} CPU-seconds per second of it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results")
    ap.add_argument("--snakemake-log", help="the run's .snakemake/log/*.snakemake.log (default: the newest)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    logs = Path(args.results) / "logs"
    if not logs.is_dir():
        sys.exit(f"{logs}: no logs; run the workflow first (make report)")
    jobs, missing = job_costs(logs)
    snake_logs = sorted((ROOT / ".snakemake" / "log").glob("*.snakemake.log"))
    slog = Path(args.snakemake_log) if args.snakemake_log else (snake_logs[-1] if snake_logs else None)
    wall = run_wall_s(slog) if slog else None
    rows = per_rule(jobs)
    print_table(rows, missing, wall)
    if args.json:
        Path(args.json).write_text(json.dumps({"rules": rows, "missing": missing, "run_wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()
