"""What bounds `plait data prepare`'s memory: the tokenizer's sample cap and the per-run totals."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHashLSH

from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.prepare.clean import empty_stats
from plait.data.prepare.dedup import _LSH_WEIGHTS
from plait.data.prepare.lsh import BandIndex
from plait.data.prepare.minhash import lean
from plait.data.prepare.output import capped_sample, sample_cutoff
from plait.data.prepare.rules import TokenizerRules
from plait.data.prepare.sources import FileTask
from plait.data.prepare.totals import MAX_EXAMPLES, MAX_NAMED_BAD_FILES, CleanTotals


def _documents(num: int, *, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    words = [f"name_{i}" for i in range(200)]
    return [(" ".join(rng.choices(words, k=rng.randint(20, 400))) + "\n", rng.getrandbits(64)) for _ in range(num)]


def test_tokenizer_sample_never_passes_its_cap():
    documents = _documents(400)
    total = sum(len(text.encode()) for text, _ in documents)
    for cap, cutoff in [(c, sample_cutoff(total, c)) for c in (total // 10, total // 3)] + [(total // 2, 1 << 64)]:
        # The hash choice alone aims at the cap but misses it either way (or takes all); the cap must hold.
        sample = list(capped_sample(iter(documents), cutoff=cutoff, max_bytes=cap))
        assert sum(size for _, size in sample) <= cap
        assert sum(size for _, size in sample) >= 0.8 * cap  # still about the cap, not a token sample
        assert all(size == len(text.encode()) for text, size in sample)


def test_prepare_reports_a_tokenizer_sample_within_sample_bytes(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i, (text, _) in enumerate(_documents(60, seed=1)):
        (root / f"doc{i:02d}.txt").write_text(text)
    rules = TokenizerRules(vocab_size=300, sample_bytes=20_000, val_fraction=0.0)
    report = prepare_corpus([str(root)], tmp_path / "out", config=PrepareConfig(workers=1, tokenizer=rules))
    assert report["output"]["chars"] > 3 * rules.sample_bytes
    assert 0.5 * rules.sample_bytes <= report["output"]["tokenizer_sample_bytes"] <= rules.sample_bytes


def test_totals_keep_bounded_names_and_exact_counts(tmp_path):
    totals = CleanTotals()
    num_files = MAX_NAMED_BAD_FILES + 50
    for i in range(num_files):
        stats = empty_stats(FileTask(i, f"f{i}", tmp_path / f"f{i}", "text", "text"))
        stats.update(bad="binary or undecodable (NUL bytes)" if i % 2 else None, docs_in=2, chars_in=10)
        stats.update(dropped={"min_chars": [1, 4]}, examples={"min_chars": [f"f{i}"]}, hist_in={"1": 2})
        totals.add(stats)
    assert totals.files == num_files and totals.docs_in == 2 * num_files and totals.chars_in == 10 * num_files
    assert totals.num_bad == num_files // 2 and totals.bad_by_reason == {"binary or undecodable": num_files // 2}
    assert len(totals.bad_named) == min(num_files // 2, MAX_NAMED_BAD_FILES) and totals.bad_named[0]["name"] == "f1"
    assert totals.examples["min_chars"] == [f"f{i}" for i in range(MAX_EXAMPLES)]
    assert totals.dropped["min_chars"] == [num_files, 4 * num_files] and totals.hist_in[1] == 2 * num_files


def test_band_index_finds_datasketchs_candidates_in_under_1kb_a_document():
    num_perm, rng = 128, np.random.default_rng(0)
    base = rng.integers(0, 2**32, size=(3000, num_perm), dtype=np.uint64).astype(np.uint32)
    # Copies of earlier signatures with most values redrawn: some share a band with their original, some not.
    mutated = base[rng.integers(0, len(base), size=1500)].copy()
    redraw = rng.random(mutated.shape) < 0.6
    mutated[redraw] = rng.integers(0, 2**32, size=int(redraw.sum()), dtype=np.uint64).astype(np.uint32)
    signatures = np.concatenate([base, mutated])[rng.permutation(4500)]
    index = BandIndex(threshold=0.5, num_perm=num_perm, weights=_LSH_WEIGHTS)
    reference = MinHashLSH(threshold=0.5, num_perm=num_perm, weights=_LSH_WEIGHTS)
    with_candidates = 0
    for doc_id, signature in enumerate(signatures):  # query then insert, as deduplicate does
        expected = sorted(reference.query(lean(signature)))
        assert index.query(signature) == expected
        with_candidates += bool(expected)
        assert index.insert(signature) == doc_id
        reference.insert(doc_id, lean(signature), check_duplication=False)
    assert with_candidates > 300  # the mutated copies were found, through the merged arrays and the pending dict
    assert np.array_equal(index.signature(4000), signatures[4000])
    assert index.nbytes() < 1024 * len(signatures)
