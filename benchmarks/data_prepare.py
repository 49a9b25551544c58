"""`plait data prepare` on the stdlib plus a planted dirty copy, and on a ~1 GB input.

Shows (issue 18): the report counts each planted kind; near-duplicate recall and precision on the
planted pairs (a copy with 10% of its identifiers renamed and 5% of its lines added and 5% reordered)
at several thresholds; the cleaned output has no planted secret and `plait train` trains on it;
throughput in MB/s with 2 workers; peak memory of `plait data prepare` run as a user runs it (a fresh
process, so nothing of this script's is inherited): the largest process's peak RSS (the kernel's
high-water mark VmHWM, read every 0.2 s, and the run's own getrusage figures for its main process
and largest worker) and the sum of PSS over the tree (shared pages counted once), on a ~1 GB input
made by repeating the stdlib with mutations (the tokenizer trains on a capped sample).

    .venv/bin/python benchmarks/data_prepare.py                  # ~1 GB large run (default)
    .venv/bin/python benchmarks/data_prepare.py --large-mb 0     # the dirty-corpus part only
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS_DIR, environment, finish, format_table, load_average
from tokenizers import Tokenizer

from plait.data.corpus import stdlib_files
from plait.data.prepare import DedupRules, PrepareConfig, prepare_corpus
from plait.data.prepare.dirty import SECRET_EMAIL, SECRET_KEY, DirtyPlan, mutate, write_dirty_corpus
from plait.data.prepare.ledger import WORK_DIR

THRESHOLDS = (0.4, 0.5, 0.6, 0.7)
_SAMPLE_S = 0.2


def stdlib_documents() -> list[tuple[str, str]]:
    files = stdlib_files()
    root = Path(*files[0].parts[: len(files[0].parts) - 1])
    while not all(str(f).startswith(str(root)) for f in files[:50]):
        root = root.parent
    return [(f.relative_to(root).as_posix(), f.read_bytes().decode("utf-8", errors="replace")) for f in files]


def tree_memory(pid: int) -> tuple[int, dict[int, int]]:
    """(sum of PSS, {pid: VmHWM}) in bytes over ``pid`` and its descendants, from /proc."""
    pids, total_pss, peaks = [pid], 0, {}
    while pids:
        current = pids.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_pss += int(line.split()[1]) * 1024
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[current] = int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pids.extend(int(p) for p in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total_pss, peaks


def measured_prepare(sources: list[str], out: Path, *, workers: int = 2) -> dict:
    """Run `plait data prepare` in a fresh process, sampling its tree's memory; the report plus the peaks."""
    command = [str(Path(sys.executable).parent / "plait"), "data", "prepare", *sources, "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--workers", str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_pss, hwm = 0, {}
    while process.poll() is None:
        pss, peaks = tree_memory(process.pid)
        peak_pss = max(peak_pss, pss)
        hwm.update({pid: max(value, hwm.get(pid, 0)) for pid, value in peaks.items()})
        time.sleep(_SAMPLE_S)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"plait data prepare failed (exit {process.returncode}): {stderr.decode()[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    largest = max(hwm, key=lambda pid: hwm[pid])
    report["measured"] = {
        "wall_s": round(time.perf_counter() - started, 2),
        "peak_pss_sum": peak_pss,
        "peak_hwm_max": hwm[largest],
        "peak_hwm_max_process": "main" if largest == process.pid else "worker",
        "peak_hwm_main": hwm.get(process.pid, 0),
    }
    return report


def near_scores(out: Path, truth: dict[str, Any]) -> dict[str, float]:
    """Recall and precision of the near pairs found, against the planted (copy, original) pairs.

    A found pair holding a planted copy is correct when its other side is the copy's original, or an
    original the run itself put in one cluster with that original (the stdlib has real near duplicates).
    """
    rows = [line.split("\t") for line in (out / "duplicates.tsv").read_text().splitlines()[1:]]
    found = {frozenset((r[1], r[2])) for r in rows if r[0] == "near"}
    same = {}
    for r in rows:  # union of originals that the run grouped (kept -> dropped), for the cluster rule
        same.setdefault(r[2], {r[2]}).add(r[1])
        same.setdefault(r[1], {r[1]}).add(r[2])
    planted = {frozenset((d["copy"], d["original"])) for d in truth["near"]}
    original_of = {d["copy"]: d["original"] for d in truth["near"]}
    with_copy = [p for p in found if any(name in original_of for name in p)]
    correct = 0
    for pair in with_copy:
        copy = next(name for name in pair if name in original_of)
        other = next(iter(pair - {copy}), copy)
        correct += other == original_of[copy] or other in same.get(original_of[copy], set())
    recall = len(found & planted) / len(planted)
    return {
        "recall": round(recall, 4),
        "precision": round(correct / max(len(with_copy), 1), 4),
        "pairs_found": len(with_copy),
        "planted": len(planted),
    }


def secrets_left(out: Path) -> int:
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    meta = json.loads((out / "meta.json").read_text())
    found = 0
    for name in ("train.bin", "val.bin"):
        tokens = np.fromfile(out / name, dtype=meta["dtype"])
        for start in range(0, len(tokens), 1 << 20):
            text = tokenizer.decode(tokens[start : start + (1 << 20) + 64].tolist())
            found += text.count(SECRET_EMAIL) + text.count(SECRET_KEY)
    return found


def train_on(out: Path, run: Path, *, vocab_size: int, steps: int) -> dict[str, float]:
    plait = Path(sys.executable).parent / "plait"
    sets = [f"data.corpus={out}", f"data.vocab_size={vocab_size}", f"train.steps={steps}", "train.global_batch=8",
            f"train.out_dir={run}", "train.eval_every=1000", "train.log_every=1"]  # fmt: skip
    subprocess.run([str(plait), "train", *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True)
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    cells = [line.split(",")[header.index("loss")] for line in lines[1:]]
    losses = [float(cell) for cell in cells if cell]
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


def write_large(root: Path, documents: list[tuple[str, str]], *, target_mb: int, seed: int = 0) -> int:
    """Rounds of the stdlib, each file an exact copy or a mutated one (half each), until ``target_mb``."""
    rng = random.Random(seed)
    written, round_index = 0, 0
    while written < target_mb * 1e6:
        for name, text in documents:
            if round_index > 0 and rng.random() < 0.5:
                text = mutate(text, rng, rename_fraction=0.1, line_fraction=0.05)
            path = root / f"r{round_index:03d}" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            written += path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        round_index += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", default="/tmp/plait-bench-data-prepare", help="scratch directory (removed at the end)"
    )
    parser.add_argument("--large-mb", type=int, default=1024, help="size of the large input (0: skip it)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--skip-dirty", action="store_true", help="only the large run (its figures alone)")
    parser.add_argument("--large-input", default=None, help="an existing large input directory (else generated)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "data_prepare.json"))
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    started, phases = time.perf_counter(), {}
    payload: dict[str, Any] = {"environment": environment(), "load_average_start": load_average()}
    documents = stdlib_documents()
    if not args.skip_dirty:
        _dirty_part(documents, work=work, payload=payload, phases=phases, args=args, started=started)
    if args.large_mb > 0:
        large_input = Path(args.large_input) if args.large_input else work / "large"
        if args.large_input:
            written = sum(p.stat().st_size for p in large_input.rglob("*") if p.is_file())
        else:
            written = write_large(large_input, documents, target_mb=args.large_mb)
        phases["generate large"] = time.perf_counter() - started - sum(phases.values())
        large = measured_prepare([str(large_input)], work / "out-large", workers=2)
        payload["large"] = {"input_bytes": written, **_run_figures(large)}
        phases["large"] = time.perf_counter() - started - sum(phases.values())
    payload["load_average_end"] = load_average()
    _print(payload)
    shutil.rmtree(work, ignore_errors=True)
    finish(args.out, payload, wall_s=time.perf_counter() - started, phase_wall_s=phases)


def _dirty_part(
    documents: list[tuple[str, str]],
    *,
    work: Path,
    payload: dict,
    phases: dict,
    args: argparse.Namespace,
    started: float,
) -> None:
    truth = write_dirty_corpus(documents, work / "dirty", DirtyPlan(num_exact=50, num_near=100, seed=0))
    config = PrepareConfig(workers=2)
    dirty = measured_prepare([str(work / "dirty" / "corpus")], work / "out-0.5", workers=config.workers)
    phases["dirty"] = time.perf_counter() - started
    payload["dirty"] = _summary(dirty, truth, out=work / "out-0.5")
    sweep = {}
    for threshold in THRESHOLDS:
        out = work / f"out-{threshold}"
        if threshold != config.dedup.threshold:  # the ledger is reused: only dedup and packing run again
            shutil.copytree(work / "out-0.5" / WORK_DIR, out / WORK_DIR)
            swept = PrepareConfig(workers=2, dedup=DedupRules(threshold=threshold))
            prepare_corpus([str(work / "dirty" / "corpus")], out, config=swept, tokenizer=str(work / "out-0.5"))
        sweep[str(threshold)] = near_scores(out, truth)
    payload["near_by_threshold"] = sweep
    payload["secrets_left_in_output"] = secrets_left(work / "out-0.5")
    payload["train"] = train_on(work / "out-0.5", work / "run", vocab_size=8192, steps=args.train_steps)
    phases["sweep+train"] = time.perf_counter() - started - sum(phases.values())
    shutil.copy(work / "out-0.5" / "lengths.png", Path(args.out).with_name("data_prepare_lengths.png"))


def _run_figures(report: dict) -> dict[str, Any]:
    return {
        "input_mb": round(report["input"]["bytes"] / 1e6, 1),
        "mb_per_s": round(report["input"]["bytes"] / 1e6 / report["measured"]["wall_s"], 2),
        "seconds": report["run"]["seconds"],
        "wall_s": report["measured"]["wall_s"],
        "peak_pss_sum_mib": round(report["measured"]["peak_pss_sum"] / 2**20, 1),
        "peak_hwm_max_mib": round(report["measured"]["peak_hwm_max"] / 2**20, 1),
        "peak_hwm_max_process": report["measured"]["peak_hwm_max_process"],
        "peak_hwm_main_mib": round(report["measured"]["peak_hwm_main"] / 2**20, 1),
        "report_peak_rss_mib": report["run"]["peak_rss_mib"],
        "memory_measured": "fresh `plait data prepare` process; VmHWM of each process and PSS sum read every "
        f"{_SAMPLE_S} s from /proc; the report's own: main's VmHWM at the end of each stage, getrusage's largest "
        "finished child (a worker)",
        "lsh_index": report["duplicates"]["lsh_index"],
        "output": report["output"],
        "stages": {s["stage"]: s["docs_removed"] for s in report["stages"]},
        "bad_files": report["bad_files"]["by_reason"],
    }


def _summary(report: dict, truth: dict, *, out: Path) -> dict[str, Any]:
    stages = {s["stage"]: s["docs_removed"] for s in report["stages"]}
    planted = {
        "exact copies": (len(truth["exact"]), stages["exact_dup"]),
        "near copies": (len(truth["near"]), stages["near_dup"]),
        "binary files": (len(truth["binary"]), report["bad_files"]["by_reason"].get("binary or undecodable", 0)),
        "huge files": (len(truth["huge"]), report["bad_files"]["by_reason"].get("too large", 0)),
        "empty files": (len(truth["empty"]), stages["empty"]),
        "repeated-line file": (1, stages["repeated_lines"]),
        "symbol file": (1, stages["alnum_fraction"]),
        "license file": (1, stages["license"]),
        "generated file": (1, stages["generated"]),
        "e-mail (secrets file)": (truth["secrets"]["emails"], report["scrub"]["emails"]),
        "keys (secrets file)": (truth["secrets"]["keys"], report["scrub"]["keys"]),
    }
    return {**_run_figures(report), "planted_vs_reported": planted, "near": near_scores(out, truth)}


def _print(payload: dict[str, Any]) -> None:
    runs = [("large", payload["large"])] if "large" in payload else []
    if "dirty" in payload:
        _print_dirty(payload)
        runs.insert(0, ("dirty stdlib", payload["dirty"]))
    headers = ["run", "input MB", "MB/s", "wall s", "peak PSS sum MiB", "largest VmHWM MiB (which)", "LSH docs",
               "out tokens"]  # fmt: skip
    rows = [
        (n, r["input_mb"], r["mb_per_s"], r["wall_s"], r["peak_pss_sum_mib"],
         f"{r['peak_hwm_max_mib']} ({r['peak_hwm_max_process']})", r["lsh_index"]["documents"], r["output"]["tokens"])
        for n, r in runs
    ]  # fmt: skip
    print(f"\n{format_table(headers, rows)}")
    print(f"load average {payload['load_average_start']} -> {payload['load_average_end']}")


def _print_dirty(payload: dict[str, Any]) -> None:
    planted = payload["dirty"]["planted_vs_reported"]
    print(format_table(["kind", "planted", "reported (whole corpus)"], [(k, p, r) for k, (p, r) in planted.items()]))
    sweep = payload["near_by_threshold"]
    rows = [(t, s["recall"], s["precision"], s["pairs_found"]) for t, s in sweep.items()]
    print(f"\n{format_table(['threshold', 'recall', 'precision', 'pairs'], rows)}")
    print(f"\nsecrets left in the output: {payload['secrets_left_in_output']}; train: {payload['train']}")


if __name__ == "__main__":
    main()
