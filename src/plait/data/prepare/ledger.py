"""The finished-file ledger under ``DIR/.prepare-work/``: one record per cleaned file.

A file's record is three files named by a key over its name, path, size, mtime and the rules:
``KEY.docs.jsonl`` (its kept documents), ``KEY.sig`` (their MinHash signatures, uint32) and
``KEY.json`` (its counts), written last and atomically: its presence marks the file done, so a
rerun skips it and reads the same documents back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plait.data.prepare.sources import FileTask
from plait.data.tokenizer import atomic_path

WORK_DIR = ".prepare-work"
# Bump when what a record holds changes, so older records are cleaned again rather than misread.
_RECORD_VERSION = 2


@dataclass(frozen=True)
class Record:
    """Where one file's record lives."""

    stats: Path
    docs: Path
    signatures: Path

    def done(self) -> bool:
        return self.stats.is_file()

    def read_stats(self) -> dict[str, Any]:
        return json.loads(self.stats.read_text())

    def write_stats(self, stats: dict[str, Any]) -> None:
        with atomic_path(self.stats) as temporary:
            temporary.write_text(json.dumps(stats) + "\n")

    def iter_docs(self) -> Iterator[dict[str, Any]]:
        """The kept documents: ``{"text", "hash", "index"}`` each."""
        if not self.docs.is_file():
            return
        with self.docs.open(encoding="utf-8") as lines:
            for line in lines:
                yield json.loads(line)

    def load_signatures(self, num_perm: int) -> np.ndarray:
        if not self.signatures.is_file() or self.signatures.stat().st_size == 0:
            return np.zeros((0, num_perm), dtype=np.uint32)
        return np.fromfile(self.signatures, dtype=np.uint32).reshape(-1, num_perm)


def record_key(task: FileTask, *, rules_fingerprint: str) -> str:
    """The key of ``task``'s record (24 characters: a run keeps one per file); a changed file or rules change it."""
    try:
        stat = task.path.stat()
        identity = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = "unreadable"
    text = f"v{_RECORD_VERSION}\0{task.name}\0{task.path.resolve()}\0{identity}\0{task.field}\0{rules_fingerprint}"
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def record_at(work_dir: Path, key: str) -> Record:
    return Record(work_dir / f"{key}.json", work_dir / f"{key}.docs.jsonl", work_dir / f"{key}.sig")
