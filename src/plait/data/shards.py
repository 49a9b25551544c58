"""Tokenize a corpus once into packed, memory-mappable train and validation files.

Documents are encoded, each followed by the end-of-text token, and packed
into one stream per split. The split is by document (never inside one), fixed
by each document's content hash, so identical documents land on the same side.
Everything is cached under ``cache_dir/<corpus fingerprint>-v<vocab_size>/``; with a
model's own tokenizer under ``cache_dir/<corpus fingerprint>-tok<tokenizer hash>-v<vocab_size>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import Tokenizer

from plait.data.corpus import Corpus, corpus_fingerprint, iter_documents
from plait.data.tokenizer import (
    EOT_ID,
    TOKENIZER_FILE,
    GivenTokenizer,
    Progress,
    atomic_path,
    check_vocab_size,
    dataset_dir,
    tokenizer_at,
)

# Bump when the packing or split changes, so older caches are rebuilt.
FORMAT_VERSION = 1
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
# Enough text per encode_batch call to keep every tokenizer thread busy.
_ENCODE_CHUNK_CHARS = 4_000_000
_UINT16_VOCAB_LIMIT = 1 << 16


@dataclass(frozen=True)
class PreparedData:
    """A tokenized corpus on disk: read the ``.bin`` files with ``TokenDataset``."""

    tokenizer_path: Path
    train_path: Path
    val_path: Path
    dtype: np.dtype
    vocab_size: int
    eot_id: int
    num_train_tokens: int
    num_val_tokens: int
    num_train_documents: int
    num_val_documents: int
    skipped_files: tuple[str, ...] = ()  # corpus files that are not text (NUL bytes, invalid UTF-8)

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer that produced these tokens."""
        return Tokenizer.from_file(str(self.tokenizer_path))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in it, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= _UINT16_VOCAB_LIMIT else np.uint32)


def prepare_dataset(
    corpus: Corpus,
    *,
    vocab_size: int,
    cache_dir: str | os.PathLike,
    val_fraction: float = 0.005,
    progress: Progress | None = None,
    tokenizer: GivenTokenizer | None = None,
) -> PreparedData:
    """Train a tokenizer on ``corpus``, tokenize it into train/val files, and cache both.

    A second call with the same corpus content and settings reads the cache
    and costs only the corpus fingerprint (one read of its files). With ``tokenizer``
    (a model's own) nothing is trained: its ``vocab_size`` and end-of-text token are used,
    and the shards are cached apart from every other tokenizer's.

    Example::

        data = prepare_dataset("stdlib", vocab_size=8192, cache_dir=".cache/data")
        train = TokenDataset(data.train_path, dtype=data.dtype, seq_len=128)
    """
    from plait.data.prepare.output import is_prepared, load_prepared  # that module imports this one

    if is_prepared(corpus):  # a directory written by `plait data prepare`: its shards as they are
        return load_prepared(corpus, vocab_size=vocab_size, tokenizer=tokenizer)
    if tokenizer is None:
        check_vocab_size(vocab_size)
    else:
        vocab_size = tokenizer.vocab_size
    _check_val_fraction(val_fraction)
    fingerprint = corpus_fingerprint(corpus)
    key = fingerprint if tokenizer is None else f"{fingerprint}-tok{tokenizer.fingerprint}"
    directory = dataset_dir(cache_dir, fingerprint=key, vocab_size=vocab_size)
    settings = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "dtype": token_dtype(vocab_size).name,
        "eot_id": EOT_ID if tokenizer is None else tokenizer.eot_id,
    }
    cached = _load_cached(directory, settings)
    if cached is not None:
        return cached
    return _build(corpus, directory=directory, settings=settings, progress=progress, tokenizer=tokenizer)


def _build(
    corpus: Corpus,
    *,
    directory: Path,
    settings: dict[str, Any],
    progress: Progress | None,
    tokenizer: GivenTokenizer | None,
) -> PreparedData:
    vocab_size = settings["vocab_size"]
    if tokenizer is None:
        tokenizer_path = tokenizer_at(directory / TOKENIZER_FILE, corpus, vocab_size=vocab_size, progress=progress)
    else:
        tokenizer_path = _write_given(directory / TOKENIZER_FILE, tokenizer)
    threshold = val_threshold(corpus, settings["val_fraction"])
    if progress is not None:
        progress("tokenizing the corpus")
    counts = _write_shards(
        corpus,
        Tokenizer.from_file(str(tokenizer_path)),
        directory=directory,
        val_threshold=threshold,
        dtype=token_dtype(vocab_size),
        eot_id=settings["eot_id"],
    )
    if progress is not None:
        progress(f"{counts['num_train_tokens']:,} train, {counts['num_val_tokens']:,} val tokens")
    from plait.data.heldout import split_record  # heldout imports this module

    meta = {**settings, **counts, "split": split_record(val_fraction=settings["val_fraction"], threshold=threshold)}
    # meta.json goes last: its presence marks a complete dataset.
    with atomic_path(directory / META_FILE) as temporary:
        temporary.write_text(json.dumps(meta, indent=2) + "\n")
    return prepared_from_meta(directory, meta)


def _write_given(path: Path, tokenizer: GivenTokenizer) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(tokenizer.json)
    return path


def document_hash(text: str) -> int:
    """A stable 64-bit hash of a document's text, which decides its split."""
    data = text.encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(
            f"val_fraction must be in [0, 1), got {val_fraction!r}; "
            "0.005 keeps half a percent of documents for validation, 0 keeps none"
        )


def val_threshold(corpus: Corpus, val_fraction: float) -> int | None:
    """The largest document hash that goes to validation (None: no validation split).

    Taking the k smallest hashes gives exactly k validation documents (more
    only when duplicates tie), at least one, and never every document.
    """
    if val_fraction == 0.0:
        return None
    hashes = np.array([document_hash(t) for t in iter_documents(corpus)], np.uint64)
    if len(hashes) < 2:
        raise ValueError(
            f"the corpus has {len(hashes)} document, too few to hold one out for "
            "validation; add documents, or set val_fraction=0 (plait train: --set data.val_fraction=0)"
        )
    return split_threshold(hashes, val_fraction)


def split_threshold(hashes: np.ndarray, val_fraction: float) -> int:
    """The largest of at least two document hashes that goes to validation: the k smallest, k =
    round(val_fraction x count) kept between 1 and count - 1."""
    hashes = np.sort(np.asarray(hashes, dtype=np.uint64))
    num_val = min(max(1, round(val_fraction * len(hashes))), len(hashes) - 1)
    return int(hashes[num_val - 1])


@dataclass
class _SplitCounts:
    num_tokens: int = 0
    num_documents: int = 0


def _write_shards(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    directory: Path,
    val_threshold: int | None,
    dtype: np.dtype,
    eot_id: int = EOT_ID,
) -> dict[str, Any]:
    """Encode every document into ``train.bin`` or ``val.bin``; return the counts."""
    train, val = _SplitCounts(), _SplitCounts()
    skipped: list[Path] = []
    with (
        atomic_path(directory / TRAIN_FILE) as train_path,
        atomic_path(directory / VAL_FILE) as val_path,
        train_path.open("wb") as train_file,
        val_path.open("wb") as val_file,
    ):
        for texts in _chunks(iter_documents(corpus, skipped=skipped)):
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            train_ids: list[list[int]] = []
            val_ids: list[list[int]] = []
            for text, encoding in zip(texts, encodings, strict=True):
                is_val = val_threshold is not None and document_hash(text) <= val_threshold
                (val_ids if is_val else train_ids).append(encoding.ids)
            _write_packed(train_ids, train_file, counts=train, dtype=dtype, eot_id=eot_id)
            _write_packed(val_ids, val_file, counts=val, dtype=dtype, eot_id=eot_id)
    if train.num_tokens == 0:
        raise ValueError("every document went to validation; lower val_fraction or add documents")
    return {
        "num_train_tokens": train.num_tokens,
        "num_val_tokens": val.num_tokens,
        "num_train_documents": train.num_documents,
        "num_val_documents": val.num_documents,
        "skipped_files": [str(path) for path in skipped],
    }


def _write_packed(
    documents: list[list[int]], file: BinaryIO, *, counts: _SplitCounts, dtype: np.dtype, eot_id: int
) -> None:
    """Append documents to ``file``, each followed by ``eot_id``, and count them."""
    packed: list[int] = []
    for ids in documents:
        packed.extend(ids)
        packed.append(eot_id)
    np.array(packed, dtype=dtype).tofile(file)
    counts.num_tokens += len(packed)
    counts.num_documents += len(documents)


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    num_chars = 0
    for text in documents:
        chunk.append(text)
        num_chars += len(text)
        if num_chars >= _ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, num_chars = [], 0
    if chunk:
        yield chunk


def _load_cached(directory: Path, settings: dict[str, Any]) -> PreparedData | None:
    """The cached dataset if its meta matches ``settings`` and its files are whole."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(meta.get(key) != value for key, value in settings.items()):
        return None
    try:
        data = prepared_from_meta(directory, meta)
    except (KeyError, TypeError):
        return None
    expected = {data.train_path: data.num_train_tokens, data.val_path: data.num_val_tokens}
    for path, num_tokens in expected.items():
        if not path.is_file() or path.stat().st_size != num_tokens * data.dtype.itemsize:
            return None
    return data if data.tokenizer_path.is_file() else None


def prepared_from_meta(directory: Path, meta: dict[str, Any]) -> PreparedData:
    """The shards a meta.json describes in `directory` (plait's cache or a `plait data prepare` output)."""
    return PreparedData(
        tokenizer_path=directory / TOKENIZER_FILE,
        train_path=directory / TRAIN_FILE,
        val_path=directory / VAL_FILE,
        dtype=np.dtype(meta["dtype"]),
        vocab_size=meta["vocab_size"],
        eot_id=meta["eot_id"],
        num_train_tokens=meta["num_train_tokens"],
        num_val_tokens=meta["num_val_tokens"],
        num_train_documents=meta["num_train_documents"],
        num_val_documents=meta["num_val_documents"],
        skipped_files=tuple(meta.get("skipped_files", ())),
    )
