"""A compact MinHash LSH index: datasketch's banding, held in sorted numpy arrays.

datasketch's ``MinHashLSH`` keeps, per band and document, a bytes key, a dict entry and a list
(measured: ~10.6 KB per document at 128 permutations and 30 bands), so its default bound of 200,000
documents alone would take ~2 GB. Here each (band, document) is one 64-bit key and one 32-bit id in
sorted arrays, and each signature one row of uint32: ~0.9 KB per document. The bands (``b`` bands of
``r`` rows) are the ones datasketch chooses for the threshold and weights, and a document is a
candidate when one whole band of its signature equals the indexed one's, as in datasketch (up to
64-bit key collisions, which only add a candidate: every candidate is checked on the full signature).
"""

from __future__ import annotations

import numpy as np
from datasketch import MinHashLSH

_MIX = np.uint64(0x9E3779B97F4A7C15)
_PENDING = 1 << 16  # (band, document) entries held in a dict before they are merged into the sorted arrays
_ROWS_PER_CHUNK = 4096  # signatures are stored in chunks of this many rows, so growing never copies them all


class BandIndex:
    """Signatures indexed by band; ``query`` gives the ids of documents that share a band, oldest first."""

    def __init__(self, *, threshold: float, num_perm: int, weights: tuple[float, float]) -> None:
        banding = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
        self.bands, self.rows, self.num_perm = banding.b, banding.r, num_perm
        self._keys = np.zeros(0, dtype=np.uint64)
        self._ids = np.zeros(0, dtype=np.uint32)
        self._pending: dict[int, list[int]] = {}
        self._num_pending = 0
        self._chunks: list[np.ndarray] = []
        self.size = 0

    def band_keys(self, signature: np.ndarray) -> np.ndarray:
        """One 64-bit key per band, from the band's index and its ``rows`` values."""
        values = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        keys = np.arange(1, self.bands + 1, dtype=np.uint64)
        for row in range(self.rows):
            keys = keys * _MIX + values[:, row]
        return keys ^ (keys >> np.uint64(29))

    def query(self, signature: np.ndarray) -> list[int]:
        keys = self.band_keys(signature)
        left, right = np.searchsorted(self._keys, keys, "left"), np.searchsorted(self._keys, keys, "right")
        found: set[int] = set()
        for start, end in zip(left[left < right].tolist(), right[left < right].tolist(), strict=True):
            found.update(self._ids[start:end].tolist())
        for key in keys.tolist():
            found.update(self._pending.get(key, ()))
        return sorted(found)

    def insert(self, signature: np.ndarray) -> int:
        """Index ``signature``; returns its id (0, 1, ...)."""
        doc_id = self.size
        if doc_id % _ROWS_PER_CHUNK == 0:
            self._chunks.append(np.empty((_ROWS_PER_CHUNK, self.num_perm), dtype=np.uint32))
        self._chunks[-1][doc_id % _ROWS_PER_CHUNK] = signature
        for key in self.band_keys(signature).tolist():
            self._pending.setdefault(key, []).append(doc_id)
        self._num_pending += self.bands
        self.size += 1
        if self._num_pending >= _PENDING:
            self._merge()
        return doc_id

    def signature(self, doc_id: int) -> np.ndarray:
        return self._chunks[doc_id // _ROWS_PER_CHUNK][doc_id % _ROWS_PER_CHUNK]

    def nbytes(self) -> int:
        """Bytes in use: the arrays' filled part, plus ~100 per pending entry (dict slot, int key, list)."""
        arrays = self._keys.nbytes + self._ids.nbytes + self.size * self.num_perm * 4
        return arrays + 100 * self._num_pending

    def _merge(self) -> None:
        keys = np.array([key for key, ids in self._pending.items() for _ in ids], dtype=np.uint64)
        ids = np.array([doc_id for doc_ids in self._pending.values() for doc_id in doc_ids], dtype=np.uint32)
        order = np.lexsort((ids, keys))
        keys, ids = keys[order], ids[order]
        at = np.searchsorted(self._keys, keys, "right")  # after equal keys: older ids stay first
        self._keys, self._ids = np.insert(self._keys, at, keys), np.insert(self._ids, at, ids)
        self._pending, self._num_pending = {}, 0
