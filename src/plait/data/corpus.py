"""Corpora: where training text comes from.

A corpus is either the string ``"stdlib"`` (the Python standard library's own
source, present on every machine with Python) or one or more paths to
``.txt``/``.py``/``.md`` files (one document each), ``.jsonl`` files (one
document per line, in the ``"text"`` field) and directories (walked
recursively for those suffixes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

STDLIB = "stdlib"
TEXT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIX = ".jsonl"
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, JSONL_SUFFIX)
# Installed packages are not the standard library; caches hold no source.
_SKIPPED_STDLIB_DIRS = ("site-packages", "dist-packages", "__pycache__")
# Bump when the way files become documents changes, so cached shards go stale.
_DOCUMENT_FORMAT_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
# A file is not text when it holds a NUL byte or when more than this share of its characters are
# invalid UTF-8 or control characters (random bytes: ~60%; the stdlib's KOI8-R test module: 41%).
_MAX_NON_TEXT_SHARE = 0.5
_NON_TEXT = dict.fromkeys(
    [c for c in (*range(32), 127) if chr(c) not in "\t\n\r\f\v"] + [0xFFFD]
)  # str.translate deletes them: one pass counts them all

Corpus = str | os.PathLike | Sequence[str | os.PathLike]


def stdlib_files() -> list[Path]:
    """The Python standard library's ``.py`` files, sorted, without site-packages.

    >>> len(stdlib_files()) > 1000
    True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS]
        files.extend(Path(directory) / name for name in filenames if name.endswith(".py"))
    return sorted(files)


def iter_documents(corpus: Corpus, *, skipped: list[Path] | None = None) -> Iterator[str]:
    """Yield the corpus's documents as strings, in a deterministic order.

    Files are decoded as UTF-8 with ``errors="replace"`` (a few stdlib files
    are not valid UTF-8). Empty documents are skipped: they carry no tokens.
    Files that are not text (see `is_text`) are skipped and appended to ``skipped``.

    >>> first = next(iter_documents("stdlib"))
    """
    num_documents = 0
    not_text = [] if skipped is None else skipped
    for _, path in corpus_files(corpus):
        for text in _file_documents(path, not_text=not_text):
            if text:
                num_documents += 1
                yield text
    if num_documents == 0 and not_text:
        shown = ", ".join(str(p) for p in not_text[:3]) + (
            f" and {len(not_text) - 3} more" if len(not_text) > 3 else ""
        )
        raise ValueError(
            f"corpus {_describe(corpus)} holds no text: its {len(not_text)} file(s) are binary (NUL bytes or "
            f"mostly invalid UTF-8): {shown}; point data.corpus at text files"
        )
    if num_documents == 0:
        raise ValueError(
            f"corpus {_describe(corpus)} holds no non-empty documents; add text to its files or point it at other files"
        )


def is_text(data: bytes) -> bool:
    """False for a file that holds a NUL byte or is mostly invalid UTF-8 or control characters.

    >>> is_text("def f():\\n    return 1\\n".encode()), is_text(bytes(range(256)))
    (True, False)
    """
    if b"\0" in data:
        return False
    text = data.decode("utf-8", errors="replace")
    bad = len(text) - len(text.translate(_NON_TEXT))
    return bad <= _MAX_NON_TEXT_SHARE * len(text)


def corpus_fingerprint(corpus: Corpus) -> str:
    """A content hash of the corpus, used as its cache key.

    It covers each file's name (relative to the path it was found under) and
    bytes, so renaming, editing, adding or reordering files changes it.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"plait-corpus-v{_DOCUMENT_FORMAT_VERSION}".encode())
    for name, path in corpus_files(corpus):
        encoded_name = name.encode()
        digest.update(len(encoded_name).to_bytes(8, "little") + encoded_name)
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def corpus_files(corpus: Corpus) -> list[tuple[str, Path]]:
    """The corpus's files as ``(relative name, path)`` pairs, in document order."""
    if isinstance(corpus, str) and corpus == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return [(path.relative_to(root).as_posix(), path) for path in stdlib_files()]
    files = [pair for entry in _as_path_list(corpus) for pair in _files_under(entry)]
    if not files:
        raise ValueError(
            f"corpus {_describe(corpus)} contains no {'/'.join(SUPPORTED_SUFFIXES)} files; "
            "point it at files or directories that hold some"
        )
    return files


def _as_path_list(corpus: Corpus) -> list[Path]:
    if isinstance(corpus, str | os.PathLike):
        return [Path(corpus)]
    if isinstance(corpus, Sequence) and all(isinstance(p, str | os.PathLike) for p in corpus):
        return [Path(p) for p in corpus]
    raise TypeError(f"corpus must be 'stdlib', a path or a list of paths, got {type(corpus).__name__}")


def _files_under(entry: Path) -> list[tuple[str, Path]]:
    if not entry.exists():
        raise ValueError(
            f"corpus path {entry} does not exist; pass 'stdlib' for the Python standard "
            f"library, or existing {'/'.join(SUPPORTED_SUFFIXES)} files or directories"
        )
    if entry.is_file():
        if entry.suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"corpus file {entry} has unsupported suffix {entry.suffix!r}; "
                f"use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
        return [(entry.name, entry)]
    return [(path.relative_to(entry).as_posix(), path) for path in _walk(entry)]


def _walk(directory: Path) -> list[Path]:
    """Supported files under ``directory``, sorted, skipping hidden entries (.git, ...)."""
    found = []
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix in SUPPORTED_SUFFIXES:
                found.append(Path(root) / name)
    return sorted(found)


def _file_documents(path: Path, *, not_text: list[Path]) -> Iterator[str]:
    if path.suffix == JSONL_SUFFIX:
        yield from _jsonl_documents(path)
        return
    data = path.read_bytes()
    if is_text(data):
        yield data.decode("utf-8", errors="replace")
    else:
        not_text.append(path)


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            line = raw_line.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            yield _jsonl_text(line, path=path, line_number=line_number)


def _jsonl_text(line: str, *, path: Path, line_number: int) -> str:
    where = f"{path}, line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error}); fix or remove it") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(
            f'{where} has no string "text" field; each line of a .jsonl corpus must be an object like {{"text": "..."}}'
        )
    return record["text"]


def _describe(corpus: Corpus) -> str:
    if isinstance(corpus, str | os.PathLike):
        return repr(str(corpus))
    return repr([str(p) for p in corpus])
