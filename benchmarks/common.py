"""The benchmark scripts' helpers: the A/B harness lives in `plait.bench.harness` (so `plait bench`
runs these scripts through the same code), re-exported here for `from common import ...`."""

from __future__ import annotations

from pathlib import Path

from plait.bench.harness import (
    count_local_model_state_bytes,
    count_model_state_bytes,
    current_rss_bytes,
    environment,
    finish,
    format_bytes,
    format_table,
    load_average,
    local_tensor,
    model_state_bytes,
    pair_order,
    peak_rss_bytes,
    ratio_summary,
    reset_peak_rss,
    run_alternating,
    run_ranks,
    spread,
    storage_bytes,
    timed_block,
    verdict,
    wait_for_quiet,
    write_json,
    write_results,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = [
    "RESULTS_DIR",
    "count_local_model_state_bytes",
    "count_model_state_bytes",
    "current_rss_bytes",
    "environment",
    "finish",
    "format_bytes",
    "format_table",
    "load_average",
    "local_tensor",
    "model_state_bytes",
    "pair_order",
    "peak_rss_bytes",
    "ratio_summary",
    "reset_peak_rss",
    "run_alternating",
    "run_ranks",
    "spread",
    "storage_bytes",
    "timed_block",
    "verdict",
    "wait_for_quiet",
    "write_json",
    "write_results",
]
