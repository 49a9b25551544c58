"""The planner on paper against published runs: Megatron-LM's 2021 table and the rows of planner_published.py.

For each row: the planner's estimated TFLOP/s per GPU for the published plan (assumptions as in
tests/unit/test_planner_golden.py: full recomputation, micro-batch 1, interleaved 1F1B where the
layers split evenly, Megatron's activation accounting, gemm_efficiency 0.7), next to the published
figure; then the plan the planner would choose itself on the same GPUs and batch, and why.

    python benchmarks/planner_golden.py            # every row (the largest searches take a while)
    python benchmarks/planner_golden.py --rows 3   # the first three

Then every run of benchmarks/planner_published.py (papers and model reports, each row with its quoted
source): the published plan, exactly as its plan string states it, estimated; the step-time error
(estimate / published - 1: positive is pessimistic) and whether the memory estimate says it fits.
Megatron-LM-family runs (Korthikanti, MT-NLG, BLOOM's Megatron-DeepSpeed) use Megatron's layer accounting
(`profile="megatron"`: materialised attention scores); the flash-attention runs (Llama 3, llm-foundry)
plait's. A row whose source says the data-parallel all-reduce was not overlapped runs with overlap 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, environment, format_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner_published import ROWS as PUBLISHED

from plait.models.gpt_config import GPTConfig
from plait.planner import Cluster, Estimator, ModelShape, SearchSpace, Workload, describe, search
from plait.planner.evaluate import checked_plan
from plait.planner.plan_string import parse_plan
from plait.planner.report import why_best
from plait.train.setup import check_pp_split
from tests.unit.test_planner_golden import ROWS, SEQ, VOCAB, megatron_tflops, published_plan

MEGATRON_SOURCES = ("Korthikanti", "Smith", "BigScience")  # Megatron-LM / Megatron-DeepSpeed runs


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


def published_step_s(row: dict[str, Any], config: GPTConfig) -> float:
    """The row's step time: as published, or from its TFLOP/s per GPU under the source's FLOP count."""
    measured = row["measured"]
    if "step_s" in measured:
        return measured["step_s"]
    assert measured["flops"] == "palm", measured
    flops = row["global_batch"] * row["seq_len"] * config.flops_per_token(row["seq_len"])
    return flops / (measured["tflops"] * 1e12 * row["gpus"])


def published_cluster(row: dict[str, Any]) -> Cluster:
    cluster = Cluster.preset(row["cluster"], nodes=row["gpus"] // 8)
    if "inter_bandwidth" in row:
        cluster = cluster.replace(inter=cluster.inter.replace(bandwidth=row["inter_bandwidth"]))
    return cluster.replace(overlap=0.0) if row.get("no_dp_overlap") else cluster


def run_published(row: dict[str, Any]) -> dict[str, Any]:
    """One published run's plan estimated as stated: step-time error and whether it fits."""
    config = GPTConfig(**row["model"])
    workload, cluster = Workload(row["global_batch"], row["seq_len"]), published_cluster(row)
    profile = "megatron" if row["source"].startswith(MEGATRON_SOURCES) else "plait"
    published = published_step_s(row, config)
    out: dict[str, Any] = {"id": row["id"], "gpus": row["gpus"], "plan": row["plan"], "profile": profile,
                           "published_step_s": published, "source": row["source"], "where": row["where"]}  # fmt: skip
    try:
        plan = checked_plan(parse_plan(row["plan"]), world=row["gpus"], workload=workload)
        check_pp_split(plan, num_layers=config.num_layers)
        estimate = Estimator(ModelShape(config), workload, cluster=cluster, profile=profile).estimate(plan)
    except ValueError as error:  # a plan the planner (or plait) cannot express yet
        return out | {"error": str(error)}
    return out | {
        "estimated_step_s": estimate.step_s, "step_error": estimate.step_s / published - 1, "fits": estimate.fits,
        "memory_gib": estimate.memory.total / 2**30, "device_gib": cluster.device_memory / 2**30,
        "estimated_time": estimate.time.as_dict(), "estimated_memory": estimate.memory.as_dict(),
    }  # fmt: skip


def published_table(rows: list[dict[str, Any]]) -> str:
    table = [
        (r["id"], r["gpus"], f"{r['published_step_s']:.3g}", f"{r['estimated_step_s']:.3g}",
         f"{100 * r['step_error']:+.1f}%", "yes" if r["fits"] else "NO", f"{r['memory_gib']:.1f}")
        if "step_error" in r else (r["id"], r["gpus"], f"{r['published_step_s']:.3g}", "-", "-", "-", r["error"][:60])
        for r in rows
    ]  # fmt: skip
    errors = sorted(abs(r["step_error"]) for r in rows if "step_error" in r)
    summary = ""
    if errors:
        median = (
            errors[len(errors) // 2]
            if len(errors) % 2
            else sum(errors[len(errors) // 2 - 1 : len(errors) // 2 + 1]) / 2
        )
        within = sum(e <= 0.10 for e in errors)
        fits = sum(r.get("fits", False) for r in rows)
        summary = (f"\n{len(errors)} rows estimated: median |step error| {100 * median:.1f}%, within 10%: {within}/"
                   f"{len(errors)} ({100 * within / len(errors):.0f}%), within 15%: {sum(e <= 0.15 for e in errors)}; "
                   f"memory says fits: {fits}/{len(errors)}")  # fmt: skip
    headers = ("published run", "GPUs", "pub s/step", "est s/step", "err", "fits", "est GiB")
    return format_table(headers, table) + summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=len(ROWS))
    parser.add_argument("--no-search", action="store_true", help="only the published plans' estimates")
    parser.add_argument("--only-published", action="store_true", help="only planner_published.py's rows")
    args = parser.parse_args(argv)
    published = [run_published(row) for row in PUBLISHED]
    print(published_table(published))
    if args.only_published:
        write_json(RESULTS_DIR / "planner-published.json", {"environment": environment(), "rows": published})
        return 0
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
    path = write_json(
        RESULTS_DIR / "planner-golden.json", {"environment": environment(), "rows": rows, "published": published}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
