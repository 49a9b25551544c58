"""`plait data prepare`: clean files in parallel into a ledger, deduplicate, tokenize, pack and report.

Outputs are written into a staging directory inside DIR and moved into place at the end (meta.json
last); on an error nothing half-written is left, and the ledger of finished files lets a rerun skip
the files already cleaned and produce the same output.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from plait.data.prepare.clean import clean_file
from plait.data.prepare.dedup import DedupResult, deduplicate
from plait.data.prepare.ledger import WORK_DIR, Record, record_at, record_key
from plait.data.prepare.output import (
    load_given_tokenizer,
    sample_cutoff,
    train_on_sample,
    val_threshold,
    write_meta,
    write_shards,
)
from plait.data.prepare.report import LENGTHS_PNG, build_report, plot_lengths, write_report
from plait.data.prepare.rules import PrepareConfig
from plait.data.prepare.sources import FileTask, list_files
from plait.data.prepare.totals import CleanTotals
from plait.data.shards import META_FILE
from plait.data.tokenizer import TOKENIZER_FILE, GivenTokenizer

Progress = Callable[[str], None]
Files = Callable[[], Iterator[tuple[FileTask, Record]]]  # every file with its ledger record, in file order
# The rule a user loosens when one stage removed everything.
_LOOSEN = {
    "empty": "the documents are empty",
    "min_chars": "lower [filters] min_chars",
    "max_chars": "raise [filters] max_chars",
    "alnum_fraction": "lower [filters] min_alnum_fraction",
    "repeated_lines": "raise [filters] max_repeated_line_fraction",
    "generated": "set [filters] drop_generated = false",
    "license": "set [filters] drop_license = false",
}


def prepare_corpus(
    sources: list[str],
    out: str | os.PathLike,
    *,
    config: PrepareConfig | None = None,
    field: str = "text",
    tokenizer: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Clean, deduplicate and tokenize ``sources`` into ``out``; returns the report (also written there).

    Example::

        report = prepare_corpus(["stdlib", "my_texts/"], "data/clean")
        # then train with data.corpus = "data/clean"
    """
    config = config or PrepareConfig()
    say = progress or (lambda message: None)
    tasks = list_files(sources, field=field)
    given = load_given_tokenizer(tokenizer) if tokenizer is not None else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a directory (it is created when missing)")
    created = not out.exists()
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        report = _run(tasks, out=out, staging=staging, config=config, given=given, say=say)
        report["sources"] = list(sources)
        _publish(staging, out)
        return report
    except ValueError:
        shutil.rmtree(out if created else staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(
    tasks: list[FileTask],
    *,
    out: Path,
    staging: Path,
    config: PrepareConfig,
    given: GivenTokenizer | None,
    say: Progress,
) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    # One 24-character key per file, not Record objects (three paths each): the file list dominates what
    # the main process holds for a corpus of many small files.
    keys = [record_key(t, rules_fingerprint=config.fingerprint()) for t in tasks]

    def files() -> Iterator[tuple[FileTask, Record]]:
        return ((task, record_at(out / WORK_DIR, key)) for task, key in zip(tasks, keys, strict=True))

    totals, num_resumed = _clean_all(files, config=config, say=say)
    seconds["clean"] = time.perf_counter() - started
    peaks = {"clean": _own_peak_mib()}
    say(f"deduplicating ({'exact + near' if config.dedup.near else 'exact'})")
    with (staging / "duplicates.tsv").open("w") as pairs:
        pairs.write("kind\tdropped\tkept\tsimilarity\n")
        dedup = deduplicate(files(), config.dedup, pairs_out=pairs)
    seconds["dedup"] = time.perf_counter() - started - sum(seconds.values())
    peaks["dedup"] = _own_peak_mib()
    if not dedup.kept_hashes:
        raise ValueError(_empty_message(totals, dedup))
    output = _tokenize(files, dedup=dedup, staging=staging, config=config, given=given, say=say)
    seconds["tokenize"] = time.perf_counter() - started - sum(seconds.values())
    peaks["tokenize"] = _own_peak_mib()
    report = build_report(totals, dedup, output=output)
    plot_lengths(staging / LENGTHS_PNG, report["lengths"])  # before the peaks: matplotlib loads here
    peaks["report"] = _own_peak_mib()
    total = time.perf_counter() - started
    report["run"] = {
        "files_resumed": num_resumed,
        "seconds": {k: round(v, 2) for k, v in {**seconds, "total": total}.items()},
        "workers": config.workers,
        "input_mb_per_s": round(report["input"]["bytes"] / 1e6 / max(total, 1e-9), 2),
        # The main process's peak RSS by the end of each stage, and the largest worker's.
        "peak_rss_mib": {
            "main_by_stage": peaks,
            "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        },
    }
    write_report(staging, report)
    return report


def _clean_all(files: Files, *, config: PrepareConfig, say: Progress) -> tuple[CleanTotals, int]:
    """The counts of every file, folded in file order: read from the ledger when done, else cleaned by workers."""
    done = [record.done() for _, record in files()]
    num_todo = len(done) - sum(done)
    say(f"cleaning {num_todo} of {len(done)} files ({sum(done)} done before) on {config.workers} workers")
    totals = CleanTotals()
    jobs = ((task, record, config) for (task, record), finished in zip(files(), done, strict=True) if not finished)
    with _cleaned(jobs, workers=min(config.workers, num_todo)) as cleaned:
        for (_, record), finished in zip(files(), done, strict=True):
            totals.add(record.read_stats() if finished else next(cleaned))
    return totals, sum(done)


@contextmanager
def _cleaned(jobs: Iterator[tuple[FileTask, Record, PrepareConfig]], *, workers: int) -> Iterator[Iterator[dict]]:
    """Each job's counts, in job order; jobs are handed out as workers take them, never listed."""
    if workers <= 1:
        yield map(_clean_job, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.imap(_clean_job, jobs, chunksize=1)


def _clean_job(job: tuple[FileTask, Record, PrepareConfig]) -> dict[str, Any]:
    task, record, config = job
    return clean_file(task, record, config)


def _kept_documents(files: Files, dedup: DedupResult) -> Iterator[tuple[str, int]]:
    for task, record in files():
        dropped = dedup.dropped.get(task.index, set())
        for doc in record.iter_docs():
            if doc["index"] not in dropped:
                yield doc["text"], doc["hash"]


def _tokenize(
    files: Files,
    *,
    dedup: DedupResult,
    staging: Path,
    config: PrepareConfig,
    given: GivenTokenizer | None,
    say: Progress,
) -> dict[str, Any]:
    def documents() -> Iterator[tuple[str, int]]:
        return _kept_documents(files, dedup)

    rules = config.tokenizer
    if given is None:
        cutoff = sample_cutoff(dedup.kept_chars, rules.sample_bytes)
        say(
            f"training a {rules.vocab_size}-token tokenizer on ~{min(rules.sample_bytes, dedup.kept_chars) / 1e6:.0f} MB"
        )
        trained, sample_bytes = train_on_sample(
            documents, cutoff=cutoff, max_bytes=rules.sample_bytes, vocab_size=rules.vocab_size
        )
        given = GivenTokenizer(json=trained.to_str(), eot_id=0, vocab_size=trained.get_vocab_size())
        how = f"trained on a {sample_bytes / 1e6:.1f} MB sample"
    else:
        how, sample_bytes = "given", 0
    tokenizer = given.load()
    (staging / TOKENIZER_FILE).write_text(given.json)
    say("tokenizing and packing the kept documents")
    threshold = val_threshold(dedup.kept_hashes, rules.val_fraction)
    counts = write_shards(documents(), tokenizer, directory=staging, eot_id=given.eot_id, threshold=threshold)
    extra = {"tokenizer_fingerprint": given.fingerprint, "rules_fingerprint": config.fingerprint()}
    write_meta(staging, tokenizer=tokenizer, eot_id=given.eot_id, counts=counts, extra=extra)
    return {
        "documents": counts["num_train_documents"] + counts["num_val_documents"],
        "chars": dedup.kept_chars,
        "tokens": counts["num_train_tokens"] + counts["num_val_tokens"],
        "train_tokens": counts["num_train_tokens"],
        "val_tokens": counts["num_val_tokens"],
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer": how,
        "tokenizer_sample_bytes": sample_bytes,
    }


def _own_peak_mib() -> float:
    """This process's peak RSS: VmHWM, which starts afresh at exec (getrusage's maximum carries over the
    RSS of the process that forked and exec'd this one), or getrusage where there is no /proc."""
    try:
        status = Path("/proc/self/status").read_text()
        return round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _publish(staging: Path, out: Path) -> None:
    """Move every output into ``out``, meta.json last: its presence marks a complete directory."""
    names = sorted(p.name for p in staging.iterdir() if p.name != META_FILE)
    for name in [*names, META_FILE]:
        os.replace(staging / name, out / name)


def _empty_message(totals: CleanTotals, dedup: DedupResult) -> str:
    removed = {"bad files": totals.num_bad, **{name: docs for name, (docs, _) in totals.dropped.items()}}
    removed["exact_dup"], removed["near_dup"] = dedup.num_exact, dedup.num_near
    worst = max(removed, key=lambda name: removed[name])
    hint = _LOOSEN.get(worst, "check the sources (see the counts)")
    return (
        f"no document is left after filtering: {worst} removed the most ({removed[worst]}; all: "
        f"{ {k: v for k, v in removed.items() if v} }); {hint}, or add text to the sources"
    )
