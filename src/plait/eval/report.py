"""`plait eval`'s output: results.json, a markdown table (checkpoints side by side) and metric-vs-step PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plait.data.tokenizer import atomic_path

_PLOTTED = {
    "plait_perplexity": "byte_perplexity",
    "plait_next_token": "acc",
    "plait_code_choice": "acc_mutual_info_pool4",
    "plait_code_line": "exact_match",
}


def write_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the three files under ``out_dir`` (each atomically); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n")]
    written.append(_write(out_dir / "results.md", markdown_table(results)))
    if len(results["checkpoints"]) > 1:
        written.append(out_dir / "metrics.png")
        with atomic_path(written[-1]) as temporary:
            plot_metrics(results, temporary)
    return written


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return path


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task and metric, one column per checkpoint (with its step); value ± standard error."""
    checkpoints = results["checkpoints"]
    header = "| task | metric | " + " | ".join(f"{c['label']} (step {c['step']})" for c in checkpoints) + " |"
    lines = [header, "|" + " --- |" * (len(checkpoints) + 2)]
    for task, metric in _task_metrics(checkpoints):
        cells = " | ".join(_cell(c["results"].get(task, {}), metric) for c in checkpoints)
        lines.append(f"| {task} | {metric} | {cells} |")
    data = results["data"]
    counts = ", ".join(f"{k.removeprefix('num_')}: {v}" for k, v in data.items() if k.startswith("num_plait"))
    lines += ["", f"Held-out data: {data['source']}, split v{data['split']['version']} ({counts} samples)."]
    if "chance_code_choice" in data:
        lines.append(
            f"Chance level of plait_code_choice: {data['chance_code_choice']:.4g} (1 / choices) for acc, acc_norm, "
            "acc_mutual_info and the pool's expected *_pool4, 0.5 for the pairwise *_pair; its headline is "
            "acc_mutual_info_pool4 (see the task's YAML)."
        )
    return "\n".join(lines) + "\n"


def _cell(metrics: dict[str, float], metric: str) -> str:
    value, stderr = metrics.get(metric), metrics.get(f"{metric}_stderr")
    if value is None:
        return ""
    return f"{value:.6g}" if stderr is None else f"{value:.6g} ± {stderr:.2g}"


def _task_metrics(checkpoints: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for checkpoint in checkpoints:
        for task, metrics in checkpoint["results"].items():
            for metric in metrics:
                if not (metric.endswith("_stderr") and metric.removesuffix("_stderr") in metrics):
                    seen[(task, metric)] = None
    return list(seen)


def plot_metrics(results: dict[str, Any], png_path: Path) -> None:
    """One panel per task: its headline metric against the checkpoints' steps."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

    checkpoints = sorted(results["checkpoints"], key=lambda c: c["step"])
    panels = [(t, m) for t, m in _task_metrics(checkpoints) if _PLOTTED.get(t, m) == m]
    figure = Figure(figsize=(4 * max(1, len(panels)), 3.5), dpi=100)
    for index, (task, metric) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        scored = [c for c in checkpoints if metric in c["results"].get(task, {})]
        steps = [c["step"] for c in scored]
        values = [c["results"][task][metric] for c in scored]
        errors = [c["results"][task].get(f"{metric}_stderr", 0.0) for c in scored]
        axes.errorbar(steps, values, yerr=errors, fmt="o-", capsize=3)
        axes.set_title(task.removeprefix("plait_"), fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path, format="png")
