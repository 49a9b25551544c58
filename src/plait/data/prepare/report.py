"""The report of a `plait data prepare` run: report.json, report.md and lengths.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plait.data.prepare.clean import LENGTH_BINS
from plait.data.prepare.dedup import DedupResult
from plait.data.prepare.filters import FILTERS
from plait.data.prepare.totals import CleanTotals

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LENGTHS_PNG = "lengths.png"
STAGES = ("empty", *FILTERS)


def build_report(totals: CleanTotals, dedup: DedupResult, *, output: dict[str, Any]) -> dict[str, Any]:
    """Counts per stage (documents, characters, tokens), bad files, scrubbing, duplicates and lengths."""
    chars_per_token = output["chars"] / max(output["tokens"], 1)
    docs_in, chars_in = totals.docs_in, totals.chars_in
    stages = [_stage("read", docs=docs_in, chars=chars_in, removed=(0, 0), chars_per_token=chars_per_token)]
    remaining = [docs_in, chars_in]
    for name in STAGES:
        removed = totals.removed(name)
        remaining = [remaining[0] - removed[0], remaining[1] - removed[1]]
        stages.append(
            _stage(
                name,
                docs=remaining[0],
                chars=remaining[1],
                removed=removed,
                chars_per_token=chars_per_token,
                examples=totals.examples.get(name, []),
            )
        )
    remaining[1] = totals.chars_kept  # scrub placeholders change lengths
    for name, removed in (
        ("exact_dup", (dedup.num_exact, dedup.chars_exact)),
        ("near_dup", (dedup.num_near, dedup.chars_near)),
    ):
        remaining = [remaining[0] - removed[0], remaining[1] - removed[1]]
        stages.append(
            _stage(name, docs=remaining[0], chars=remaining[1], removed=removed, chars_per_token=chars_per_token)
        )
    return {
        "input": {"files": totals.files, "bytes": totals.bytes, "documents": docs_in, "chars": chars_in},
        "bad_files": {"count": totals.num_bad, "by_reason": dict(totals.bad_by_reason), "files": totals.bad_named},
        "stages": stages,
        "scrub": {"emails": totals.emails, "keys": totals.keys, "documents": totals.scrubbed_docs},
        "duplicates": _duplicates(dedup),
        "output": {**output, "chars_per_token": round(chars_per_token, 3)},
        "lengths": {
            "bin_edges_chars": [round(float(e), 1) for e in LENGTH_BINS],
            "input": list(totals.hist_in),
            "kept": dedup.hist_kept,
        },
    }


def _stage(
    name: str,
    *,
    docs: int,
    chars: int,
    removed: tuple[int, int],
    chars_per_token: float,
    examples: list[str] | None = None,
) -> dict[str, Any]:
    # Removed documents are never tokenized: their tokens are estimated at the kept text's characters per token.
    return {
        "stage": name,
        "docs_removed": removed[0],
        "chars_removed": removed[1],
        "tokens_removed_est": round(removed[1] / chars_per_token),
        "docs_left": docs,
        "chars_left": chars,
        "tokens_left_est": round(chars / chars_per_token),
        "examples": examples or [],
    }


def _duplicates(dedup: DedupResult) -> dict[str, Any]:
    sizes: dict[int, int] = {}
    for size in dedup.cluster_sizes.values():
        sizes[size] = sizes.get(size, 0) + 1
    largest = sorted(dedup.cluster_sizes.items(), key=lambda item: (-item[1], item[0]))[:10]
    return {
        "exact_removed": dedup.num_exact,
        "near_removed": dedup.num_near,
        "clusters": len(dedup.cluster_sizes),
        "cluster_size_counts": {str(k): v for k, v in sorted(sizes.items())},
        "largest_clusters": [{"kept": name, "size": size} for name, size in largest],
        "examples": [{"kept": kept, "dropped": dropped} for kept, dropped in dedup.cluster_examples.items()],
        "lsh_index": {
            "documents": dedup.num_indexed,
            "not_indexed_past_bound": dedup.num_unindexed,
            "bytes_estimate": dedup.index_bytes_estimate,
        },
    }


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """report.json and report.md (lengths.png is plot_lengths')."""
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (directory / REPORT_MD).write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    source = report["input"]
    lines = [
        "# plait data prepare",
        "",
        f"Input: {source['files']:,} files, {source['bytes'] / 1e6:.1f} MB, {source['documents']:,} documents.",
        f"Bad files: {report['bad_files']['count']} {report['bad_files']['by_reason']}",
        "",
        "| stage | docs removed | tokens removed (est.) | docs left | tokens left (est.) | examples |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for s in report["stages"]:
        lines.append(
            f"| {s['stage']} | {s['docs_removed']:,} | {s['tokens_removed_est']:,} | {s['docs_left']:,} "
            f"| {s['tokens_left_est']:,} | {', '.join(s['examples'][:2])} |"
        )
    scrub, dup, out = report["scrub"], report["duplicates"], report["output"]
    lines += [
        "",
        f"Scrubbed: {scrub['emails']} e-mail addresses, {scrub['keys']} keys in {scrub['documents']} documents.",
        f"Duplicates: {dup['exact_removed']} exact, {dup['near_removed']} near, in {dup['clusters']} clusters "
        f"(sizes: {dup['cluster_size_counts']}); LSH index: {dup['lsh_index']['documents']:,} documents, "
        f"~{dup['lsh_index']['bytes_estimate'] / 1e6:.1f} MB, {dup['lsh_index']['not_indexed_past_bound']} past its bound.",
        f"Output: {out['documents']:,} documents, {out['train_tokens']:,} train + {out['val_tokens']:,} val tokens "
        f"(vocabulary {out['vocab_size']:,}, tokenizer {out['tokenizer']}).",
    ]
    for example in dup["examples"][:5]:
        lines.append(f"- duplicate cluster: kept {example['kept']}, dropped {', '.join(example['dropped'])}")
    for bad in report["bad_files"]["files"][:10]:
        lines.append(f"- bad file {bad['name']}: {bad['reason']}")
    return "\n".join(lines) + "\n"


def plot_lengths(path: Path, lengths: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = lengths["bin_edges_chars"]
    figure, axes = plt.subplots(figsize=(7, 4))
    for name in ("input", "kept"):
        axes.stairs(
            lengths[name], edges, label=f"{name} documents", fill=name == "input", alpha=0.5 if name == "input" else 1
        )
    axes.set_xscale("log")
    axes.set_xlabel("document length (characters)")
    axes.set_ylabel("documents")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
