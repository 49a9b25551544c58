"""Where `plait data prepare` reads: directories of text files, .jsonl/.parquet files with a field, or stdlib.

Every source is checked before any work starts (a missing path is one clear error); files are read
one at a time by the workers, and a file that cannot be read is a bad file, named in the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from plait.data.corpus import STDLIB, is_text, stdlib_files

RECORD_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class FileTask:
    """One file to clean: ``name`` is what the report calls it."""

    index: int
    name: str
    path: Path
    kind: str  # "text" | "jsonl" | "parquet"
    field: str


class BadFile(Exception):
    """A file that cannot be used (unreadable, binary or undecodable, too large): counted, never fatal."""


def list_files(sources: list[str], *, field: str = "text") -> list[FileTask]:
    """Every file the sources hold, in a fixed order; raises ValueError for a source that does not exist."""
    if not sources:
        raise ValueError("no sources given; pass directories, .jsonl/.parquet files, or stdlib")
    pairs: list[tuple[str, Path]] = []
    for source in sources:
        pairs.extend(_source_files(source))
    tasks = [FileTask(i, name, path, _kind(path), field) for i, (name, path) in enumerate(pairs)]
    if any(t.kind == "parquet" for t in tasks):
        _require_pyarrow()
    return tasks


def _source_files(source: str) -> list[tuple[str, Path]]:
    if source == STDLIB:
        files = stdlib_files()
        root = os.path.commonpath([str(p) for p in files])
        return [(f"stdlib/{p.relative_to(root).as_posix()}", p) for p in files]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"source {source} does not exist; pass existing directories, .jsonl/.parquet files or stdlib")
    if path.is_file():
        return [(path.name, path)]
    files = []
    for root, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(filenames) if not n.startswith("."))
    return [(f"{path.name}/{p.relative_to(path).as_posix()}", p) for p in sorted(files)]


def _kind(path: Path) -> str:
    return path.suffix.lstrip(".") if path.suffix in RECORD_SUFFIXES else "text"


def _require_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError("reading .parquet needs pyarrow: pip install 'plait[data]'") from None


def read_documents(task: FileTask, *, max_file_bytes: int, batch_docs: int) -> Iterator[list[str]]:
    """The file's documents in batches; raises BadFile for a file that cannot be used."""
    if task.kind == "text":
        yield [_read_text(task.path, max_file_bytes=max_file_bytes)]
    elif task.kind == "jsonl":
        yield from _batched(_jsonl_texts(task), batch_docs)
    else:
        yield from _parquet_batches(task, batch_docs=batch_docs)


def _read_text(path: Path, *, max_file_bytes: int) -> str:
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            raise BadFile(f"too large ({size:,} bytes > max_file_bytes {max_file_bytes:,})")
        data = path.read_bytes()
    except OSError as err:
        raise BadFile(f"unreadable ({err.strerror or err})") from None
    if not is_text(data):
        raise BadFile("binary or undecodable (NUL bytes or mostly invalid UTF-8)")
    return data.decode("utf-8", errors="replace")


def _jsonl_texts(task: FileTask) -> Iterator[str]:
    try:
        lines = task.path.open("rb")
    except OSError as err:
        raise BadFile(f"unreadable ({err.strerror or err})") from None
    with lines:
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                yield ""  # a bad record is an empty document: counted, never fatal
                continue
            value = record.get(task.field) if isinstance(record, dict) else None
            yield value if isinstance(value, str) else ""


def _parquet_batches(task: FileTask, *, batch_docs: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(task.path)
    except (OSError, ValueError) as err:
        raise BadFile(f"unreadable parquet ({str(err)[:200]})") from None
    if task.field not in parquet.schema_arrow.names:
        raise BadFile(f"no column {task.field!r} (columns: {parquet.schema_arrow.names[:8]}); pass --field")
    for batch in parquet.iter_batches(batch_size=batch_docs, columns=[task.field]):
        yield [value if isinstance(value, str) else "" for value in batch.column(0).to_pylist()]


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
