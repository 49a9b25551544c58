"""The planner on paper against Megatron-LM's published runs (../shared/GOLDEN.md, Narayanan et al. 2021).

For each row: the planner's estimated TFLOP/s per GPU for the published plan (assumptions as in
tests/unit/test_planner_golden.py: full recomputation, micro-batch 1, interleaved 1F1B where the
layers split evenly, Megatron's activation accounting, gemm_efficiency 0.7), next to the published
figure; then the plan the planner would choose itself on the same GPUs and batch, and why.

    python benchmarks/planner_golden.py            # every row (the largest searches take a while)
    python benchmarks/planner_golden.py --rows 3   # the first three
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, Estimator, ModelShape, SearchSpace, Workload, describe, search
from plait.planner.report import why_best
from tests.unit.test_planner_golden import ROWS, SEQ, VOCAB, megatron_tflops, published_plan


def run_row(row: tuple, *, search_plans: bool) -> dict[str, Any]:
    params, heads, hidden, layers, tp, pp, gpus, batch, published = row
    config = GPTConfig(vocab_size=VOCAB, max_seq_len=SEQ, d_model=hidden, num_layers=layers, num_heads=heads)
    shape, workload = ModelShape(config), Workload(batch, SEQ)
    cluster = Cluster.preset("a100-80gb", nodes=gpus // 8)
    plan = published_plan(layers, tp, pp, gpus, batch)
    estimate = Estimator(shape, workload, cluster=cluster, profile="megatron").estimate(plan)
    out: dict[str, Any] = {
        "params_b": params, "gpus": gpus, "published_plan": describe(plan), "published_tflops": published,
        "estimated_tflops": megatron_tflops(layers, hidden, batch, estimate.step_s, gpus),
        "estimated_memory_gib": estimate.memory.total / 2**30, "estimated_time": estimate.time.as_dict(),
    }  # fmt: skip
    if search_plans:
        started = time.perf_counter()
        space = SearchSpace(recompute=("full", "selective"), max_microbatches_per_stage=4, selective_ratio=1.0)
        result = search(shape, workload, cluster=cluster, space=space, profile="megatron")
        best = result.best
        out |= {"search_s": time.perf_counter() - started, "num_plans": len(result.estimates)}
        if best is not None:
            out |= {
                "chosen_plan": describe(best.plan),
                "chosen_tflops_same_count": megatron_tflops(layers, hidden, batch, best.step_s, gpus),
                "chosen_speedup_vs_published": estimate.step_s / best.step_s - 1,
                "why": why_best(result),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=len(ROWS))
    parser.add_argument("--no-search", action="store_true", help="only the published plans' estimates")
    args = parser.parse_args(argv)
    rows = []
    for row in ROWS[: args.rows]:
        rows.append(run_row(row, search_plans=not args.no_search))
        print(f"  {row[0]}B done", file=sys.stderr, flush=True)
    table = [
        (r["params_b"], r["gpus"], r["published_plan"], r["published_tflops"], f"{r['estimated_tflops']:.1f}",
         f"{100 * (r['estimated_tflops'] / r['published_tflops'] - 1):+.1f}%", r.get("chosen_plan", "-"),
         f"{100 * r['chosen_speedup_vs_published']:+.1f}%" if "chosen_plan" in r else "-",
         f"{r['search_s']:.1f}" if "search_s" in r else "-")
        for r in rows
    ]  # fmt: skip
    headers = ("B", "GPUs", "published plan", "pub TFLOP/s", "est", "err", "planner's plan", "est gain", "search s")
    print(format_table(headers, table))
    for r in rows:
        if "why" in r:
            print(f"\n{r['params_b']}B on {r['gpus']} GPUs:\n{r['why']}")
    path = write_json(RESULTS_DIR / "planner-golden.json", {"environment": environment(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
