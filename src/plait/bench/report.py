"""`plait bench`'s outputs: the JSON record, a markdown table and a PNG chart of tokens/s per case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plait.bench.harness import format_bytes, write_json

HEADERS = [
    "case",
    "plan",
    "system",
    "tokens/s (median)",
    "min-max",
    "plait/peer (median, min-max)",
    "MFU",
    "model states/rank",
    "peak RSS/rank",
    "comm/step/rank",
    "comm share",
    "status",
]


def _rate(row: dict[str, Any]) -> tuple[str, str]:
    rate = row.get("tokens_per_s")
    if not rate:
        return "-", "-"
    return f"{rate['median']:.0f}", f"{rate['min']:.0f}-{rate['max']:.0f}"


def _ratio(row: dict[str, Any]) -> str:
    ratio = row.get("ratio_plait_over_peer")
    if not ratio:
        return "-"
    return f"{ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}, {len(ratio['per_pair'])} pairs)"


def _bytes(values: list[int] | int | None) -> str:
    if values is None:
        return "-"
    values = values if isinstance(values, list) else [values]
    return " / ".join(format_bytes(v) for v in values)


def table_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for case in record["cases"]:
        for row in case["rows"]:
            median, span = _rate(row)
            mfu = row.get("mfu")
            rows.append(
                [
                    case["case"]["name"],
                    case["case"]["plan"],
                    row["system"],
                    median,
                    span,
                    _ratio(row),
                    "-" if mfu is None else f"{100 * mfu:.2f}%",
                    _bytes(row.get("model_state_bytes_per_rank")),
                    _bytes(row.get("peak_rss_bytes_per_rank")),
                    _bytes(row.get("comm_bytes_per_step_per_rank")),
                    "-" if row.get("comm_share") is None else f"{100 * row['comm_share']:.1f}%",
                    row.get("status", "ran"),
                ]
            )
    return rows


def markdown(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        f"# plait bench --suite {record['suite']} ({record['device']})",
        "",
        f"plait {env['plait']}, torch {env['torch']}, backend {env['backend']}, {env['cpu_model']} "
        f"({env['cpu_count']} cores), GPU {env['gpu_model'] or 'none'}, {env['date']}; load average "
        f"{record['load_average_start']} at start, {record['load_average_end']} at end; "
        f"wall {record['wall_s']:.0f} s",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(record)]
    lines += ["", *(f"- {p['line']}" for p in record["peaks"].values())]
    lines += [
        "- A/B alternated per case (A B, B A, ...); ratio = median of the per-pair ratios plait/peer.",
        "- comm/step: bytes plait's counter sent per step per rank; comm share: the share of step time in "
        "collectives where the script measures it (moe.py: all-to-all, torch.profiler on rank 0), else -.",
    ]
    return "\n".join(lines) + "\n"


def chart(record: dict[str, Any], path: Path) -> Path:
    """Bars of median tokens/s per case and system, whiskers at min and max."""
    from matplotlib.figure import Figure  # Agg, no global pyplot state

    bars = [(c["case"]["name"], r) for c in record["cases"] for r in c["rows"] if r.get("tokens_per_s")]
    figure = Figure(figsize=(max(6.0, 1.1 * len(bars)), 4.0))
    axes = figure.add_subplot()
    medians = [r["tokens_per_s"]["median"] for _, r in bars]
    errors = [
        [m - r["tokens_per_s"]["min"] for m, (_, r) in zip(medians, bars, strict=True)],
        [r["tokens_per_s"]["max"] - m for m, (_, r) in zip(medians, bars, strict=True)],
    ]
    colors = ["tab:blue" if r["system"] == "plait" else "tab:gray" for _, r in bars]
    axes.bar(range(len(bars)), medians, yerr=errors, color=colors, capsize=3)
    axes.set_xticks(range(len(bars)), [f"{name}\n{r['system']}" for name, r in bars], fontsize=7)
    axes.set_ylabel("tokens/s (median, min-max)")
    axes.set_title(f"plait bench --suite {record['suite']}: plait (blue) vs peers (grey)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_outputs(record: dict[str, Any], out: Path) -> dict[str, Path]:
    stem = f"bench-{record['suite']}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    record["outputs"] = {kind: str(path) for kind, path in paths.items()}
    write_json(paths["json"], record)
    paths["markdown"].write_text(markdown(record))
    chart(record, paths["png"])
    return paths
