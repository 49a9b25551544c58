"""The kept documents -> a tokenizer (trained on a bounded sample, or given) and packed train/val shards.

The directory has the layout of `plait.data.shards`' cache (tokenizer.json, train.bin, val.bin,
meta.json), so ``data.corpus = "DIR"`` trains on it: `plait.data.shards.prepare_dataset` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from plait.data.shards import (
    FORMAT_VERSION,
    META_FILE,
    TRAIN_FILE,
    VAL_FILE,
    PreparedData,
    prepared_from_meta,
    split_threshold,
    token_dtype,
)
from plait.data.tokenizer import EOT, TOKENIZER_FILE, GivenTokenizer, train_tokenizer

PREPARED_BY = "plait data prepare"
# Text encoded per call: the batch's encodings (~100 bytes a token) are alive at once; past ~1M characters
# a larger batch adds memory (measured: 4M characters held ~50 MB more) and no speed.
_ENCODE_BATCH_CHARS = 1_000_000


def val_threshold(kept_hashes: list[int], val_fraction: float) -> int | None:
    """The largest document hash that goes to validation: the k smallest, as plait.data.shards splits."""
    if val_fraction == 0.0 or len(kept_hashes) < 2:
        return None
    return split_threshold(np.array(kept_hashes, dtype=np.uint64), val_fraction)


def sample_cutoff(kept_chars: int, sample_bytes: int) -> int:
    """Documents whose hash is below this train the tokenizer: about ``sample_bytes`` of text, a fixed choice."""
    share = min(1.0, sample_bytes / max(kept_chars, 1))
    return (1 << 64) if share >= 1.0 else int(share * (1 << 64))


def load_given_tokenizer(path: str | Path) -> GivenTokenizer:
    """A tokenizer.json (or a directory holding one) with an end-of-text token, reused instead of training."""
    file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ValueError(f"--tokenizer {path}: no {TOKENIZER_FILE} there; pass a prepared directory or the file")
    tokenizer = Tokenizer.from_file(str(file))
    eot_id = tokenizer.token_to_id(EOT)
    for name in ("</s>", "<eos>", "<|end_of_text|>"):
        eot_id = eot_id if eot_id is not None else tokenizer.token_to_id(name)
    if eot_id is None:
        raise ValueError(f"--tokenizer {path}: it has no end-of-text token ({EOT} or </s>) to separate documents")
    return GivenTokenizer(json=tokenizer.to_str(), eot_id=eot_id, vocab_size=tokenizer.get_vocab_size())


def capped_sample(documents: Iterator[tuple[str, int]], *, cutoff: int, max_bytes: int) -> Iterator[tuple[str, int]]:
    """(text, UTF-8 bytes) of the documents whose hash is below ``cutoff``, each taken while the sample stays
    within ``max_bytes``.

    The hash choice gives about ``max_bytes`` of UTF-8; the cap makes it a bound, since the BPE trainer's
    memory grows with its sample (a document that would pass the cap is skipped, later smaller ones may fit).
    """
    total = 0
    for text, doc_hash in documents:
        if doc_hash >= cutoff:
            continue
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if total + size <= max_bytes:
            total += size
            yield text, size


def train_on_sample(
    documents: Callable[[], Iterator[tuple[str, int]]], *, cutoff: int, max_bytes: int, vocab_size: int
) -> tuple[Tokenizer, int]:
    """A tokenizer trained on the capped sample, and the sample's size in bytes."""
    sizes: list[int] = []

    def sample() -> Iterator[str]:
        for text, size in capped_sample(documents(), cutoff=cutoff, max_bytes=max_bytes):
            sizes.append(size)
            yield text

    return train_tokenizer(sample(), vocab_size=vocab_size), sum(sizes)


def write_shards(
    documents: Iterator[tuple[str, int]],
    tokenizer: Tokenizer,
    *,
    directory: Path,
    eot_id: int,
    threshold: int | None,
) -> dict[str, int]:
    """Encode and pack every kept document into ``train.bin`` / ``val.bin``; return the counts."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    counts = dict.fromkeys(("num_train_tokens", "num_val_tokens", "num_train_documents", "num_val_documents"), 0)
    with (directory / TRAIN_FILE).open("wb") as train, (directory / VAL_FILE).open("wb") as val:
        for batch in _batches(documents):
            encodings = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
            for (_, doc_hash), encoding in zip(batch, encodings, strict=True):
                split = "val" if threshold is not None and doc_hash <= threshold else "train"
                np.array([*encoding.ids, eot_id], dtype=dtype).tofile(val if split == "val" else train)
                counts[f"num_{split}_tokens"] += len(encoding.ids) + 1
                counts[f"num_{split}_documents"] += 1
    return counts


def write_meta(directory: Path, *, tokenizer: Tokenizer, eot_id: int, counts: dict[str, int], extra: dict) -> None:
    vocab_size = tokenizer.get_vocab_size()
    meta = {
        "format_version": FORMAT_VERSION,
        "prepared_by": PREPARED_BY,
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "eot_id": eot_id,
        **counts,
        **extra,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def is_prepared(path: Any) -> bool:
    """Whether ``path`` is a directory written by `plait data prepare`."""
    if not isinstance(path, str | Path) or not Path(path).is_dir():
        return False
    try:
        return json.loads((Path(path) / META_FILE).read_text()).get("prepared_by") == PREPARED_BY
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_prepared(path: str | Path, *, vocab_size: int, tokenizer: GivenTokenizer | None = None) -> PreparedData:
    """The shards in a prepared directory, checked against the run's vocabulary (and a model's tokenizer)."""
    directory = Path(path)
    meta = json.loads((directory / META_FILE).read_text())
    if tokenizer is not None and meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise ValueError(
            f"data.corpus={str(path)!r} was tokenized by another tokenizer than the model's; prepare it again "
            f"with the model's: plait data prepare ... --tokenizer MODEL_DIR/{TOKENIZER_FILE}"
        )
    if tokenizer is None and meta["vocab_size"] != vocab_size:
        raise ValueError(
            f"data.corpus={str(path)!r} holds a {meta['vocab_size']}-token vocabulary, not data.vocab_size="
            f"{vocab_size}; set data.vocab_size={meta['vocab_size']}"
        )
    return prepared_from_meta(directory, meta)


def _batches(documents: Iterator[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    num_chars = 0
    for item in documents:
        batch.append(item)
        num_chars += len(item[0])
        if num_chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, num_chars = [], 0
    if batch:
        yield batch
