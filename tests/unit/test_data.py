"""plait.data: corpora, tokenizer, cached shards and the sharded resumable loader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.data import (
    EOT,
    EOT_ID,
    ShardedLoader,
    TokenDataset,
    corpus_fingerprint,
    eval_batches,
    iter_documents,
    load_or_train_tokenizer,
    prepare_dataset,
    stdlib_files,
    train_tokenizer,
)
from plait.data.shards import document_hash

VOCAB = 320
WORDS = ["def", "class", "return", "import", "lambda", "yield", "value", "self", "data", "name"]


def _write_corpus(directory: Path, *, num_docs: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 40))]
        (directory / f"doc{i:04d}.txt").write_text(f"# doc {i}\n" + " ".join(words) + "\n")
    return directory


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare_dataset([str(corpus_dir)], vocab_size=VOCAB, cache_dir=cache, val_fraction=0.1)


def _token_file(tmp_path: Path, num_tokens: int, *, dtype=np.uint16) -> Path:
    path = tmp_path / "tokens.bin"
    np.arange(num_tokens, dtype=dtype).tofile(path)
    return path


# ---- corpus -------------------------------------------------------------------------------


def test_stdlib_files_lists_the_standard_library_only():
    files = stdlib_files()
    assert len(files) > 1000
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)


def test_iter_documents_reads_text_jsonl_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "skip.csv").write_text("not a document")
    (tmp_path / "bad.py").write_bytes(b"x = '\xff'\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    documents = list(iter_documents([str(tmp_path)]))
    assert documents == ["alpha", "x = '\ufffd'\n", "one", "two", "beta"]
    assert list(iter_documents(rows)) == ["one", "two"]


def test_corpus_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"corpus path .*missing does not exist"):
        list(iter_documents([str(tmp_path / "missing")]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 2 has no string \"text\""):
        list(iter_documents(rows))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no"):
        list(iter_documents(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(iter_documents(tmp_path / "blank.txt"))
    with pytest.raises(TypeError, match="corpus must be"):
        list(iter_documents(42))


def test_fingerprint_follows_content(tmp_path):
    corpus = _write_corpus(tmp_path / "c", num_docs=3)
    before = corpus_fingerprint([str(corpus)])
    assert corpus_fingerprint([str(corpus)]) == before
    (corpus / "doc0001.txt").write_text("changed")
    assert corpus_fingerprint([str(corpus)]) != before


# ---- tokenizer ----------------------------------------------------------------------------


def test_tokenizer_round_trips_ascii_and_unicode(corpus_dir):
    tokenizer = train_tokenizer(iter_documents(corpus_dir), vocab_size=VOCAB)
    assert tokenizer.token_to_id(EOT) == EOT_ID == 0
    assert tokenizer.get_vocab_size() <= VOCAB
    for text in ["def f(x):\n    return x + 1\n", "naïve café — 日本語 🐍\t\r\n", "  spaces  "]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tokenizer_is_cached(corpus_dir, tmp_path):
    first = load_or_train_tokenizer(corpus_dir, vocab_size=VOCAB, cache_dir=tmp_path)
    (saved,) = tmp_path.glob("*/tokenizer.json")
    mtime = saved.stat().st_mtime_ns
    second = load_or_train_tokenizer(corpus_dir, vocab_size=VOCAB, cache_dir=tmp_path)
    assert saved.stat().st_mtime_ns == mtime
    assert first.get_vocab() == second.get_vocab()
    with pytest.raises(ValueError, match="vocab_size must be"):
        train_tokenizer(["x"], vocab_size=100)


# ---- shards -------------------------------------------------------------------------------


def test_prepare_dataset_packs_documents_with_eot(prepared, corpus_dir):
    assert prepared.dtype == np.uint16
    assert prepared.eot_id == EOT_ID
    train = np.fromfile(prepared.train_path, dtype=prepared.dtype)
    val = np.fromfile(prepared.val_path, dtype=prepared.dtype)
    assert len(train) == prepared.num_train_tokens and len(val) == prepared.num_val_tokens
    assert train.max() < prepared.vocab_size
    assert (train == EOT_ID).sum() == prepared.num_train_documents
    assert (val == EOT_ID).sum() == prepared.num_val_documents
    assert train[-1] == EOT_ID and val[-1] == EOT_ID
    assert prepared.num_train_documents + prepared.num_val_documents == 240
    assert prepared.num_val_documents == 24


def _decoded_documents(path: Path, prepared) -> set[str]:
    tokens = np.fromfile(path, dtype=prepared.dtype).tolist()
    tokenizer = prepared.load_tokenizer()
    documents, current = [], []
    for token in tokens:
        if token == EOT_ID:
            documents.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return set(documents)


def test_split_is_by_whole_document(prepared, corpus_dir):
    train = _decoded_documents(prepared.train_path, prepared)
    val = _decoded_documents(prepared.val_path, prepared)
    assert train.isdisjoint(val)
    assert train | val == set(iter_documents(corpus_dir))
    threshold = max(document_hash(d) for d in val)
    assert all(document_hash(d) > threshold for d in train)


def test_prepare_dataset_reuses_cache_and_notices_changes(tmp_path):
    corpus = _write_corpus(tmp_path / "c", num_docs=60)
    cache = tmp_path / "cache"
    first = prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=cache, val_fraction=0.1)
    mtimes = [p.stat().st_mtime_ns for p in (first.tokenizer_path, first.train_path)]
    again = prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=cache, val_fraction=0.1)
    assert again == first
    assert [p.stat().st_mtime_ns for p in (again.tokenizer_path, again.train_path)] == mtimes
    (corpus / "doc0000.txt").write_text("brand new text\n")
    changed = prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=cache, val_fraction=0.1)
    assert changed.train_path.parent != first.train_path.parent
    meta = json.loads((changed.train_path.parent / "meta.json").read_text())
    assert meta["num_train_tokens"] == changed.num_train_tokens
    assert not list(cache.glob("*/.*"))  # no temporary files left behind


def test_prepare_dataset_rejects_bad_settings(tmp_path):
    corpus = _write_corpus(tmp_path / "c", num_docs=1)
    with pytest.raises(ValueError, match="val_fraction must be"):
        prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="too few to hold one out"):
        prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=tmp_path, val_fraction=0.1)
    solo = prepare_dataset(corpus, vocab_size=VOCAB, cache_dir=tmp_path, val_fraction=0.0)
    assert solo.num_val_tokens == 0 and solo.num_train_documents == 1


# ---- loader -------------------------------------------------------------------------------


def test_token_dataset_windows(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 103), dtype=np.uint16, seq_len=10)
    assert len(dataset) == 10
    assert dataset[3].dtype == torch.int64
    assert dataset[3].tolist() == list(range(30, 40))
    with pytest.raises(IndexError):
        dataset[10]
    with pytest.raises(ValueError, match=r"holds 103 tokens.*seq_len=200"):
        TokenDataset(dataset.path, dtype=np.uint16, seq_len=200)
    with pytest.raises(ValueError, match="does not exist"):
        TokenDataset(tmp_path / "missing.bin", dtype=np.uint16, seq_len=4)


def _global_batches(dataset, *, dp_size: int, num_steps: int, state=None, **kwargs):
    """Each step's global batch, concatenated from every rank in rank order."""
    loaders = [
        ShardedLoader(dataset, dp_rank=r, dp_size=dp_size, **{"global_batch": 8, "seed": 3, **kwargs})
        for r in range(dp_size)
    ]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    steps = []
    for _ in range(num_steps):
        batches = [loader.next_batch() for loader in loaders]
        steps.append(torch.cat([b["input_ids"] for b in batches]))
    return steps, loaders[0]


def test_loader_batches_are_deterministic_and_unshifted(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 500), dtype=np.uint16, seq_len=5)
    loader = ShardedLoader(dataset, global_batch=8, dp_rank=1, dp_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 5) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    first, _ = _global_batches(dataset, dp_size=1, num_steps=5)
    second, _ = _global_batches(dataset, dp_size=1, num_steps=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    other_seed, _ = _global_batches(dataset, dp_size=1, num_steps=5, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed, strict=True))


def test_global_batches_do_not_depend_on_dp_size(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 300), dtype=np.uint16, seq_len=6)
    reference, _ = _global_batches(dataset, dp_size=1, num_steps=15)
    for dp_size in (2, 4):
        steps, _ = _global_batches(dataset, dp_size=dp_size, num_steps=15)
        assert all(torch.equal(a, b) for a, b in zip(reference, steps, strict=True))


def test_epochs_cross_seamlessly(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 60), dtype=np.uint16, seq_len=6)  # 10 samples
    steps, loader = _global_batches(dataset, dp_size=2, num_steps=5)  # 40 samples, 4 epochs
    assert loader.epoch == 4
    starts = torch.cat(steps)[:, 0].div(6, rounding_mode="floor").tolist()
    epochs = [starts[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]
    ordered, _ = _global_batches(dataset, dp_size=2, num_steps=2, shuffle=False)
    assert torch.cat(ordered)[:, 0].tolist() == [6 * (i % 10) for i in range(16)]


def test_resume_under_another_dp_size(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 400), dtype=np.uint16, seq_len=4)
    uninterrupted, _ = _global_batches(dataset, dp_size=2, num_steps=30)
    _, loader = _global_batches(dataset, dp_size=2, num_steps=17)
    state = loader.state_dict()
    assert state == {"offset": 136, "seed": 3, "global_batch": 8, "num_samples": 100}
    resumed, _ = _global_batches(dataset, dp_size=4, num_steps=13, state=state, seed=99)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[17:], resumed, strict=True))
    smaller = TokenDataset(_token_file(tmp_path, 200), dtype=np.uint16, seq_len=4)
    fresh = ShardedLoader(smaller, global_batch=8, dp_rank=0, dp_size=1, seed=3)
    with pytest.raises(ValueError, match="the dataset changed"):
        fresh.load_state_dict(state)


def test_loader_rejects_uneven_batches(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 100), dtype=np.uint16, seq_len=4)
    with pytest.raises(ValueError, match=r"global_batch=10 .* dp_size=4 .* such as 8 or 12"):
        ShardedLoader(dataset, global_batch=10, dp_rank=0, dp_size=4, seed=0)
    with pytest.raises(ValueError, match="dp_rank must be"):
        ShardedLoader(dataset, global_batch=8, dp_rank=2, dp_size=2, seed=0)


def test_eval_batches_are_a_fixed_sharded_prefix(tmp_path):
    dataset = TokenDataset(_token_file(tmp_path, 100), dtype=np.uint16, seq_len=4)  # 25 samples
    whole = eval_batches(dataset, batch_size=4, num_batches=3, dp_rank=0, dp_size=1)
    assert [b["input_ids"][:, 0].tolist() for b in whole] == [[0, 4, 8, 12], [16, 20, 24, 28], [32, 36, 40, 44]]
    shards = [eval_batches(dataset, batch_size=4, num_batches=3, dp_rank=r, dp_size=2) for r in range(2)]
    for step, batch in enumerate(whole):
        joined = torch.cat([shards[r][step]["input_ids"] for r in range(2)])
        assert torch.equal(joined, batch["input_ids"])
    assert len(eval_batches(dataset, batch_size=4, num_batches=100, dp_rank=0, dp_size=1)) == 6
    with pytest.raises(ValueError, match="fewer than one eval batch"):
        eval_batches(dataset, batch_size=32, num_batches=1, dp_rank=0, dp_size=1)
