"""Exact (content hash) and near (MinHash LSH) duplicate removal over the cleaned files, in file order.

The first document of a cluster is kept; later ones that equal it (exact) or whose estimated
Jaccard similarity with an indexed document reaches the threshold (near) are dropped. Only kept
documents enter the LSH index, which is bounded by ``max_index_docs``: past it documents are
still checked against the index but no longer added to it (counted in the report).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from plait.data.prepare.clean import LENGTH_BINS, _bin, doc_name
from plait.data.prepare.ledger import Record
from plait.data.prepare.lsh import BandIndex
from plait.data.prepare.minhash import similarity
from plait.data.prepare.rules import DedupRules
from plait.data.prepare.sources import FileTask

_EXAMPLE_CLUSTERS = 10
# Band sizes chosen to miss few true pairs (false negatives weigh 0.8): every candidate is checked against
# the threshold with the full signature, so a false positive costs one comparison, never a wrong drop.
_LSH_WEIGHTS = (0.2, 0.8)


@dataclass
class DedupResult:
    dropped: dict[int, set[int]] = field(default_factory=dict)  # file index -> document indices dropped
    num_exact: int = 0
    chars_exact: int = 0
    num_near: int = 0
    chars_near: int = 0
    kept_hashes: list[int] = field(default_factory=list)
    kept_chars: int = 0
    hist_kept: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_BINS) - 1))
    cluster_sizes: dict[str, int] = field(default_factory=dict)  # kept doc name -> cluster size (>= 2)
    cluster_examples: dict[str, list[str]] = field(default_factory=dict)
    num_indexed: int = 0
    num_unindexed: int = 0
    index_bytes_estimate: int = 0


def deduplicate(
    files: Iterable[tuple[FileTask, Record]], rules: DedupRules, *, pairs_out: TextIO | None = None
) -> DedupResult:
    """Decide which cleaned documents are duplicates; write ``kind  dropped  kept  similarity`` lines."""
    result = DedupResult()
    first_of: dict[int, str] = {}  # content hash -> the kept document's name
    lsh = BandIndex(threshold=rules.threshold, num_perm=rules.num_perm, weights=_LSH_WEIGHTS) if rules.near else None
    indexed_names: list[str] = []
    for task, record in files:
        signatures = record.load_signatures(rules.num_perm) if lsh is not None else None
        for row, doc in enumerate(record.iter_docs()):
            name, text_len = doc_name(task, doc["index"]), len(doc["text"])
            duplicate = _exact(doc["hash"], first_of)
            kind, similar = ("exact", 1.0) if duplicate is not None else ("", 0.0)
            if duplicate is None and lsh is not None:
                assert signatures is not None
                duplicate, similar = _near(signatures[row], lsh, names=indexed_names, rules=rules)
                kind = "near" if duplicate is not None else ""
            if duplicate is not None:
                _drop(result, task=task, doc=doc, kind=kind, chars=text_len)
                _cluster(result, kept=duplicate, dropped=name)
                if pairs_out is not None:
                    pairs_out.write(f"{kind}\t{name}\t{duplicate}\t{similar:.3f}\n")
                continue
            first_of[doc["hash"]] = name
            result.kept_hashes.append(doc["hash"])
            result.kept_chars += text_len
            result.hist_kept[_bin(text_len)] += 1
            if lsh is not None:
                _index(lsh, signatures[row], name=name, names=indexed_names, result=result, rules=rules)
    if lsh is not None:
        result.index_bytes_estimate = lsh.nbytes() + sum(len(name) + 49 for name in indexed_names)
    return result


def _exact(content_hash: int, first_of: dict[int, str]) -> str | None:
    return first_of.get(content_hash)


def _near(signature: np.ndarray, lsh: BandIndex, *, names: list[str], rules: DedupRules) -> tuple[str | None, float]:
    """The most similar indexed document at or above the threshold (LSH candidates, checked; ties: the oldest)."""
    best, best_similarity = None, 0.0
    for key in lsh.query(signature):
        value = similarity(signature, lsh.signature(key))
        if value >= rules.threshold and value > best_similarity:
            best, best_similarity = names[key], value
    return best, best_similarity


def _index(
    lsh: BandIndex, signature: np.ndarray, *, name: str, names: list[str], result: DedupResult, rules: DedupRules
) -> None:
    if lsh.size >= rules.max_index_docs:
        result.num_unindexed += 1
        return
    lsh.insert(signature)
    names.append(name)
    result.num_indexed += 1


def _drop(result: DedupResult, *, task: FileTask, doc: dict[str, Any], kind: str, chars: int) -> None:
    result.dropped.setdefault(task.index, set()).add(doc["index"])
    if kind == "exact":
        result.num_exact += 1
        result.chars_exact += chars
    else:
        result.num_near += 1
        result.chars_near += chars


def _cluster(result: DedupResult, *, kept: str, dropped: str) -> None:
    result.cluster_sizes[kept] = result.cluster_sizes.get(kept, 1) + 1
    if kept in result.cluster_examples or len(result.cluster_examples) < _EXAMPLE_CLUSTERS:
        examples = result.cluster_examples.setdefault(kept, [])
        if len(examples) < 3:
            examples.append(dropped)
