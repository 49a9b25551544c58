"""One file through normalise -> filters -> scrub -> hash and MinHash: the work each pool worker does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from plait.data.prepare.filters import first_failure
from plait.data.prepare.ledger import Record
from plait.data.prepare.minhash import Signer
from plait.data.prepare.normalise import normalise
from plait.data.prepare.rules import PrepareConfig
from plait.data.prepare.scrub import scrub
from plait.data.prepare.sources import BadFile, FileTask, read_documents
from plait.data.shards import document_hash

# Document lengths in characters, on a log scale: 10^0 .. 10^8 in quarter decades.
LENGTH_BINS = np.logspace(0, 8, 33)
_EXAMPLES_PER_FILTER = 3


def doc_name(task: FileTask, index: int) -> str:
    return task.name if task.kind == "text" else f"{task.name}#{index}"


def empty_stats(task: FileTask) -> dict[str, Any]:
    return {
        "name": task.name,
        "bytes": _size(task.path),
        "bad": None,
        "docs_in": 0,
        "chars_in": 0,
        "dropped": {},
        "examples": {},
        "emails": 0,
        "keys": 0,
        "scrubbed_docs": 0,
        "docs_kept": 0,
        "chars_kept": 0,
        "hist_in": {},  # length bin -> documents, sparse: a run can hold many files' counts at once
    }


def clean_file(task: FileTask, record: Record, config: PrepareConfig) -> dict[str, Any]:
    """Clean one file into its ledger record and return its counts; a bad file is counted, never raised."""
    stats = empty_stats(task)
    signer = Signer(config.dedup.num_perm, config.dedup.shingle_words) if config.dedup.near else None
    try:
        with record.docs.open("w", encoding="utf-8") as docs, record.signatures.open("wb") as signatures:
            index = 0
            for batch in read_documents(task, max_file_bytes=config.max_file_bytes, batch_docs=config.batch_docs):
                for text in batch:
                    kept = _clean_document(text, name=doc_name(task, index), stats=stats, config=config)
                    if kept is not None:
                        docs.write(json.dumps({"text": kept, "hash": document_hash(kept), "index": index}) + "\n")
                        if signer is not None:
                            signatures.write(signer.signature(kept).tobytes())
                    index += 1
    except BadFile as bad:
        stats = {**empty_stats(task), "bad": str(bad)}
        record.docs.unlink(missing_ok=True)
        record.signatures.unlink(missing_ok=True)
        if str(bad).startswith("unreadable"):
            return stats  # not recorded: a rerun tries it again (permissions may have been fixed)
    record.write_stats(stats)
    return stats


def _clean_document(text: str, *, name: str, stats: dict[str, Any], config: PrepareConfig) -> str | None:
    text = normalise(text)
    stats["docs_in"] += 1
    stats["chars_in"] += len(text)
    key = str(_bin(len(text)))
    stats["hist_in"][key] = stats["hist_in"].get(key, 0) + 1
    failed = "empty" if not text.strip() else first_failure(text, config.filters)
    if failed is not None:
        count = stats["dropped"].setdefault(failed, [0, 0])
        count[0] += 1
        count[1] += len(text)
        examples = stats["examples"].setdefault(failed, [])
        if len(examples) < _EXAMPLES_PER_FILTER:
            examples.append(name)
        return None
    text, num_emails, num_keys = scrub(text, config.scrub)
    stats["emails"] += num_emails
    stats["keys"] += num_keys
    stats["scrubbed_docs"] += bool(num_emails or num_keys)
    stats["docs_kept"] += 1
    stats["chars_kept"] += len(text)
    return text


def _bin(num_chars: int) -> int:
    return int(np.clip(np.searchsorted(LENGTH_BINS, max(num_chars, 1), side="right") - 1, 0, len(LENGTH_BINS) - 2))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
