"""Turn each benchmark script's JSON into the rows of `plait bench`'s table, one per system.

A row: system, tokens/s (median, min, max over the A/B blocks), the per-pair ratio plait/peer,
seconds per step, model-state bytes per rank, peak RSS per rank, comm bytes per step per rank
(plait's counter), and a status ("ran", or why not). Figures the script does not measure are None.
"""

from __future__ import annotations

from typing import Any


def _row(system: str, **values: Any) -> dict[str, Any]:
    base = {
        "system": system,
        "status": "ran",
        "tokens_per_s": None,
        "ratio_plait_over_peer": None,
        "step_s": None,
        "model_state_bytes_per_rank": None,
        "peak_rss_bytes_per_rank": None,
        "comm_bytes_per_step_per_rank": None,
        "comm_share": None,
    }
    return base | values


def _not_run(system: str, why: str) -> dict[str, Any]:
    return _row(system, status=why)


def deepspeed_row(recorded: str | None) -> dict[str, Any]:
    """DeepSpeed's row when the script did not run it: why, as the script recorded it. The script, not
    this process, decides: it runs with the case's PYTHONPATH (`plait bench --peer-path DIR`)."""
    if recorded and "No module named 'deepspeed'" in recorded:
        recorded = (
            "not installed where the case ran (pip install --target DIR deepspeed ...; plait bench --peer-path DIR)"
        )
    return _not_run("deepspeed", recorded or "the script did not run it")


def read_dp(payload: dict[str, Any]) -> list[dict[str, Any]]:
    summary = payload["summary"]
    ranks = payload["per_rank"]
    peaks = summary["memory"]["peak_rss_bytes_per_rank"]
    rows = []
    for name in ("plait", "ddp"):
        rows.append(
            _row(
                name,
                tokens_per_s=summary["tokens_per_s"][name],
                ratio_plait_over_peer=None if name == "plait" else summary["ratio_plait_over_ddp"],
                step_s=summary["step_s_median"][name],
                model_state_bytes_per_rank=[r["model_state_bytes"][name]["total"] for r in ranks],
                peak_rss_bytes_per_rank=peaks,
                comm_bytes_per_step_per_rank=summary["comm"]["plait_bytes_per_step_per_rank"]
                if name == "plait"
                else None,
            )
        )
    return rows


def read_zero(payload: dict[str, Any]) -> list[dict[str, Any]]:
    stages = payload["speed"]["stages"]
    if not stages:
        return [_not_run("plait", f"skipped: {payload['speed'].get('skipped')}")]
    (record,) = stages.values()
    peer = record["peer"]
    rows = []
    for name in ("plait", peer):
        rows.append(
            _row(
                name,
                tokens_per_s=record["tokens_per_s"][name],
                ratio_plait_over_peer=None if name == "plait" else record["ratio_plait_over_peer"],
                step_s=record["step_s_median"][name],
                model_state_bytes_per_rank=[record["model_state_bytes_rank0"][name]["total"]],
                comm_bytes_per_step_per_rank=record["plait_comm_bytes_per_step"] if name == "plait" else None,
            )
        )
    ds = record.get("deepspeed")
    if not ds:
        return [*rows, deepspeed_row(payload.get("deepspeed"))]
    ds_row = _row(
        "deepspeed",
        tokens_per_s=ds["tokens_per_s"]["deepspeed"],
        ratio_plait_over_peer=ds["ratio_plait_over_deepspeed"],
        step_s=ds["step_s_median"]["deepspeed"],
    )
    return [*rows, ds_row]


def read_pipeline(payload: dict[str, Any]) -> list[dict[str, Any]]:
    record = payload["torch"]["schedules"]["1f1b"]
    return [
        _row(
            name,
            tokens_per_s=record["tokens_per_s"][name],
            ratio_plait_over_peer=None if name == "plait" else record["ratio_plait_over_torch"],
        )
        for name in ("plait", "torch")
    ]


def read_gpu(payload: dict[str, Any]) -> list[dict[str, Any]]:
    record = payload["llama-1b"]
    rate = record["tokens_per_s"]
    return [
        _row(
            "plait",
            tokens_per_s={"median": rate, "min": rate, "max": rate},
            step_s=record["median_step_s"],
            peak_rss_bytes_per_rank=list(record["memory_bytes"].values())[:1],  # CUDA max allocated, or RSS
            mfu=record["mfu"],  # the script's, against the GPU's measured bf16 peak
        )
    ]


def read_moe(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """benchmarks/moe.py: one row per system and ep; its all-to-all share of step time (torch.profiler)."""
    rows = []
    for record in payload["rows"]:
        name = f"{record['system']} ep{record['ep']}"
        if "refused" in record:
            rows.append(
                deepspeed_row(record["refused"]) | {"system": name}
                if record["system"] == "deepspeed"
                else _not_run(name, f"refused: {record['refused']}")
            )
            continue
        runs = record["tokens_per_s_runs"]
        rows.append(
            _row(
                name,
                tokens_per_s={"median": record["tokens_per_s"], "min": min(runs), "max": max(runs)},
                model_state_bytes_per_rank=[record["model_states_per_rank"]],
                peak_rss_bytes_per_rank=[record["peak_rss_per_rank"]],
                comm_share=record["all_to_all_share"],
            )
        )
    return rows


READERS = {
    "read_moe": read_moe,
    "read_dp": read_dp,
    "read_zero": read_zero,
    "read_pipeline": read_pipeline,
    "read_gpu": read_gpu,
}
