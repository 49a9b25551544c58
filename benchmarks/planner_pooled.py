"""The planner's step-time estimates against the median of repeated benchmark runs.

Pools several `benchmarks/planner.py` results (each a full pass: calibrate, estimate, measure):
per plan, the median of the runs' estimates against the median of every timed step of every run
(of each run's median where older results kept no steps).

    python benchmarks/planner_pooled.py results/planner.json results/planner-earlier-run-4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import format_table


def pooled_rows(runs: list[dict]) -> list[tuple[str, str, float, float, float]]:
    rows = []
    for world in runs[0]["worlds"]:
        by_plan: dict[str, list[dict]] = {}
        for run in runs:
            for row in run["worlds"][world]["rows"]:
                by_plan.setdefault(row["plan"], []).append(row)
        for plan, results in by_plan.items():
            estimate = statistics.median(r["est_step_s"] for r in results)
            measured = statistics.median(s for r in results for s in r.get("step_seconds") or [r["step_s"]])
            rows.append((world, plan, estimate, measured, estimate / measured - 1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="planner.py result JSON files")
    args = parser.parse_args(argv)
    rows = pooled_rows([json.loads(path.read_text()) for path in args.results])
    table = [(w, plan, f"{e:.3f}", f"{m:.3f}", f"{100 * err:+.1f}%") for w, plan, e, m, err in rows]
    print(format_table(["world", "plan", "est s (median)", "measured s (median)", "err"], table))
    within = sum(abs(err) <= 0.10 for *_, err in rows)
    worst = max(abs(err) for *_, err in rows)
    print(f"{len(args.results)} runs pooled: {within} of {len(rows)} plans within 10%, worst {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
