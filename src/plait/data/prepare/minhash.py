"""MinHash signatures over word shingles, computed in numpy with datasketch's permutations.

datasketch hashes one shingle at a time in Python; here the shingle hashes are built in numpy and
the min over datasketch's own (a, b) permutations (its default "affine32" scheme: a MurmurHash3
finaliser, then ``a * h + b`` in uint32) is taken in blocks, so the signatures equal
``datasketch.MinHash(hashfunc=identity).update_batch(hashes)`` (tests check it) at numpy speed.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHash

SEED = 1
SCHEME = "affine32"
_WORD = re.compile(r"\w+")
_MAX_HASH = np.uint64((1 << 32) - 1)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 4096  # shingles per block: (num_perm, _BLOCK) uint32 temporaries, 2 MiB at 128 permutations
_FMIX32 = (16, np.uint32(0x85EBCA6B), 13, np.uint32(0xC2B2AE35), 16)  # MurmurHash3's 32-bit finaliser


class Signer:
    """Turns a document into its MinHash signature (``num_perm`` uint32 values)."""

    def __init__(self, num_perm: int, shingle_words: int) -> None:
        a, b = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
        self._a = a.astype(np.uint32)[:, None]
        self._b = b.astype(np.uint32)[:, None]
        self.num_perm = num_perm
        self.shingle_words = shingle_words

    def signature(self, text: str) -> np.ndarray:
        hashes = fmix32(shingle_hashes(text, self.shingle_words))
        signature = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, len(hashes), _BLOCK):
            permuted = self._a * hashes[None, start : start + _BLOCK] + self._b  # wraps: mod 2^32
            np.minimum(signature, permuted.min(axis=1), out=signature)
        return signature


def fmix32(hashes: np.ndarray) -> np.ndarray:
    """MurmurHash3's finaliser on uint32 values (datasketch's pre-mix, a bijection)."""
    s1, m1, s2, m2, s3 = _FMIX32
    hashes = hashes ^ (hashes >> np.uint32(s1))
    hashes = hashes * m1
    hashes = hashes ^ (hashes >> np.uint32(s2))
    hashes = hashes * m2
    return hashes ^ (hashes >> np.uint32(s3))


def shingle_hashes(text: str, shingle_words: int) -> np.ndarray:
    """The distinct 32-bit hashes of the text's runs of ``shingle_words`` words (stable across processes)."""
    words = _WORD.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint32)
    table = {w: zlib.crc32(w.encode()) for w in set(words)}
    ids = np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))
    width = min(shingle_words, len(ids))
    mixed = np.zeros(len(ids) - width + 1, dtype=np.uint64)
    for offset in range(width):
        mixed = mixed * _MIX + ids[offset : offset + len(mixed)]
    return np.unique(((mixed * _MIX) >> np.uint64(32)).astype(np.uint32))  # the well-mixed high half


def lean(signature: np.ndarray) -> LeanMinHash:
    """The signature as datasketch's LeanMinHash, which its LSH index takes."""
    return LeanMinHash(seed=SEED, hashvalues=signature, scheme=SCHEME)


def similarity(first: np.ndarray, second: np.ndarray) -> float:
    """The MinHash estimate of the Jaccard similarity: the share of equal signature values."""
    return float(np.count_nonzero(first == second)) / len(first)
