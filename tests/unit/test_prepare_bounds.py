"""What bounds `plait data prepare`'s memory: the tokenizer's sample cap and the per-run totals."""

from __future__ import annotations

import random

from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.prepare.clean import empty_stats
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
