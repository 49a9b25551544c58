"""Compare `plait bench`'s figures with the same scripts run directly (the same options, right after).

    plait bench --suite quick --out benchmarks/results/bench-quick
    python benchmarks/dp.py --quick --out benchmarks/results/bench-quick/direct/dp.json   # and zero, pipeline, moe
    python benchmarks/bench_vs_scripts.py

Both sides go through the same reader (plait.bench.read); counted figures (model-state and comm bytes) must
match exactly, timed ones agree only within the box's noise, so the ratios' min-max ranges are printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS_DIR, format_table, write_json

from plait.bench.read import READERS
from plait.bench.suites import all_cases

DIRECT = {"dp.py": "dp.json", "zero.py": "zero.json", "pipeline.py": "pipeline.json", "moe.py": "moe.json"}


def _ratio(row: dict) -> str:
    ratio = row.get("ratio_plait_over_peer")
    return f"{ratio['median']:.3f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if ratio else "-"


def compare(bench_dir: Path) -> list[dict]:
    record = json.loads((bench_dir / "bench-quick.json").read_text())
    rows = []
    for case in record["cases"]:
        script = Path(case["case"]["script"]).name
        direct = READERS[all_cases()[case["case"]["name"]].reader](
            json.loads((bench_dir / "direct" / DIRECT[script]).read_text())
        )
        for ours, theirs in zip(case["rows"], direct, strict=True):
            if not ours.get("tokens_per_s"):
                continue
            counted = ("model_state_bytes_per_rank", "comm_bytes_per_step_per_rank")
            rows.append({"case": case["case"]["name"], "system": ours["system"],
                         "bench_tokens_per_s": ours["tokens_per_s"]["median"],
                         "script_tokens_per_s": theirs["tokens_per_s"]["median"],
                         "bench_ratio": _ratio(ours), "script_ratio": _ratio(theirs),
                         "counted_equal": all(ours[k] == theirs[k] for k in counted)})  # fmt: skip
    return rows


def main() -> int:
    bench_dir = RESULTS_DIR / "bench-quick"
    rows = compare(bench_dir)
    cells = [[r["case"], r["system"], f"{r['bench_tokens_per_s']:.0f}", f"{r['script_tokens_per_s']:.0f}",
              f"{r['bench_tokens_per_s'] / r['script_tokens_per_s']:.2f}", r["bench_ratio"], r["script_ratio"],
              str(r["counted_equal"])] for r in rows]  # fmt: skip
    headers = ["case", "system", "bench tok/s", "script tok/s", "bench/script", "bench plait/peer",
               "script plait/peer", "bytes equal"]  # fmt: skip
    print(format_table(headers, cells))
    print(f"wrote {write_json(bench_dir / 'bench-vs-scripts.json', {'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
