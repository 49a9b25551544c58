"""Text tasks: what each makes of token rows, and that every plan reads the same samples.

Random choices come from (seed, global position) only, so the global batches are the same under any
dp and across a resume; masking, sentence order and span corruption are checked against their recipes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plait.data.loader import ShardedLoader, TokenDataset, make_batch
from plait.losses import IGNORE_INDEX
from plait.tasks.masked_lm import MaskedLM, SentenceOrderMLM
from plait.tasks.span_corruption import SpanCorruption, span_counts
from plait.tasks.text import CausalLMTask

VOCAB = 500
SEQ = 32


def tasks() -> dict[str, object]:
    return {
        "causal_lm": CausalLMTask(),
        "masked_lm": MaskedLM(vocab_size=VOCAB, seed=7),
        "masked_lm_sop": SentenceOrderMLM(vocab_size=VOCAB, seed=7),
        "span_corruption": SpanCorruption(vocab_size=VOCAB, seed=7),
    }


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(1, VOCAB, size=40 * SEQ).astype(np.uint16).tofile(path)
    return path


def global_batches(task, token_file, *, dp_size: int, steps: int, start: int = 0) -> list[dict]:
    """Each step's global batch, concatenated from the dp ranks' loaders (resumed at step `start`)."""
    dataset = TokenDataset(token_file, dtype=np.uint16, seq_len=task.sample_tokens(SEQ))
    loaders = [
        ShardedLoader(dataset, global_batch=8, dp_rank=r, dp_size=dp_size, seed=3, batch_maker=task.make_batch)
        for r in range(dp_size)
    ]
    for loader in loaders:
        loader.load_state_dict({**loader.state_dict(), "offset": start * 8})
    out = []
    for _ in range(steps):
        parts = [loader.next_batch() for loader in loaders]
        out.append({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
    return out


@pytest.mark.parametrize("kind", list(tasks()))
def test_every_dp_and_a_resume_see_the_same_global_batches(kind: str, token_file) -> None:
    task = tasks()[kind]
    whole = global_batches(task, token_file, dp_size=1, steps=8)  # 64 samples: past the first epoch
    for dp_size in (2, 4):
        for one, other in zip(whole, global_batches(task, token_file, dp_size=dp_size, steps=8), strict=True):
            assert one.keys() == other.keys()
            assert all(torch.equal(one[key], other[key]) for key in one)
    resumed = global_batches(task, token_file, dp_size=2, steps=3, start=5)
    assert all(torch.equal(whole[5 + i][key], resumed[i][key]) for i in range(3) for key in whole[0])


def test_another_seed_masks_other_tokens(token_file) -> None:
    rows = torch.from_numpy(np.random.default_rng(1).integers(1, VOCAB, size=(4, SEQ - 2)))
    one = MaskedLM(vocab_size=VOCAB, seed=0).make_batch(rows, np.arange(4))
    other = MaskedLM(vocab_size=VOCAB, seed=1).make_batch(rows, np.arange(4))
    assert not torch.equal(one["labels"], other["labels"])


def test_causal_lm_task_is_the_plain_batch() -> None:
    rows = torch.arange(12).reshape(2, 6)
    made, plain = CausalLMTask(eot_id=0).make_batch(rows, np.arange(2)), make_batch(rows, eot_id=0)
    assert made.keys() == plain.keys() and all(torch.equal(made[k], plain[k]) for k in made)


def test_masked_lm_masks_15_percent_80_10_10() -> None:
    task = MaskedLM(vocab_size=VOCAB, seed=0)
    rows = torch.from_numpy(np.random.default_rng(2).integers(1, VOCAB, size=(2000, 30)))
    batch = task.make_batch(rows, np.arange(2000))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (2000, 32)
    assert (ids[:, 0] == task.tokens.cls).all() and (ids[:, -1] == task.tokens.sep).all()
    assert ((labels != IGNORE_INDEX).sum(dim=1) == round(0.15 * 30)).all()  # a fixed number per sequence
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], rows[chosen[:, 1:-1]])  # labels are the original tokens
    masked = (ids[chosen] == task.tokens.mask).float().mean().item()
    kept = (ids[chosen] == labels[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / VOCAB) < 0.015  # random draws hit the original 1/V
    assert torch.equal(ids[~chosen][ids[~chosen] < VOCAB], rows[~chosen[:, 1:-1]])  # the rest untouched
    assert (ids[chosen] <= task.tokens.mask).all() and (ids[~chosen] != task.tokens.mask).all()


def test_sentence_order_swaps_half_the_pairs_and_marks_them() -> None:
    task = SentenceOrderMLM(vocab_size=VOCAB, seed=0)
    rows = torch.arange(1000 * 29).reshape(1000, 29) % VOCAB  # increasing inside a row: order is visible
    batch = task.make_batch(rows, np.arange(1000))
    ids, labels, types, order = (batch[k] for k in ("input_ids", "labels", "token_type_ids", "sentence_order_label"))
    assert ids.shape == types.shape == (1000, 32) and abs(order.float().mean().item() - 0.5) < 0.05
    originals = torch.where(labels != IGNORE_INDEX, labels, ids)  # the tokens before masking
    for i in (0, 1, 2, 3, 4, 5):
        cut = 1 + (15 if order[i] else 14)  # A is the first half (14 tokens), or the second (15) when swapped
        first, second = originals[i, 1:cut], originals[i, cut + 1 : -1]
        assert ids[i, cut] == task.tokens.sep and types[i, cut + 1 :].eq(1).all() and types[i, : cut + 1].eq(0).all()
        expected = (rows[i, 14:], rows[i, :14]) if order[i] else (rows[i, :14], rows[i, 14:])
        assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])
    assert ((labels != IGNORE_INDEX).sum(dim=1) == round(0.15 * 29)).all()


def test_span_corruption_reconstructs_the_row_with_t5_lengths() -> None:
    task = SpanCorruption(vocab_size=VOCAB, seed=0)
    rows = torch.from_numpy(np.random.default_rng(3).integers(1, VOCAB, size=(200, 128)))
    batch = task.make_batch(rows, np.arange(200))
    noise, spans = span_counts(128, noise_density=0.15, mean_span=3.0)
    assert (noise, spans) == (19, 6)
    assert batch["input_ids"].shape == (200, 128 - noise + spans + 1)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (200, noise + spans + 1)
    assert (batch["decoder_input_ids"][:, 0] == task.tokens.pad).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    for i in range(200):
        inputs, targets = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        assert inputs[-1] == targets[-1] == task.tokens.eos
        spans_of = {}
        for token in targets[:-1]:
            if token >= task.tokens.sentinel(0):
                current = spans_of.setdefault(token, [])
            else:
                current.append(token)
        rebuilt = [t for token in inputs[:-1] for t in spans_of.get(token, [token])]
        assert rebuilt == rows[i].tolist()
        assert [t for t in inputs if t >= VOCAB + 2][:spans] == [task.tokens.sentinel(j) for j in range(spans)]


@pytest.mark.parametrize("preset", ["bert-tiny", "albert-tiny", "t5-tiny"])
def test_task_losses_equal_the_models_own(preset: str) -> None:
    """loss_sum / count is what transformers computes from the same labels: BERT's masked-LM mean,
    ALBERT's masked-LM mean + sentence-order mean, T5's mean over target tokens."""
    from plait.models.language import build_language, language_task_kind

    kinds = {"masked_lm": MaskedLM, "masked_lm_sop": SentenceOrderMLM, "span_corruption": SpanCorruption}
    task = kinds[language_task_kind(preset)](vocab_size=VOCAB, seed=0)
    torch.manual_seed(0)
    model = build_language(preset, vocab_size=VOCAB, max_positions=SEQ)
    rows = torch.from_numpy(np.random.default_rng(4).integers(1, VOCAB, size=(6, task.sample_tokens(SEQ))))
    batch = task.make_batch(rows, np.arange(6))
    outputs = model(**batch)
    loss_sum, count = task.loss_fn(outputs, batch)
    torch.testing.assert_close(loss_sum / count, outputs.loss, rtol=1e-6, atol=0)


def test_whole_word_masking_chooses_whole_words_only() -> None:
    from plait.data.tokenizer import train_tokenizer
    from plait.tasks.masked_lm import WordEdges

    text = "def default_value(self):\n    return self.x + other_name[3]\n" * 20
    tokenizer = train_tokenizer([text], vocab_size=300)
    words = WordEdges.of(tokenizer)
    ids = np.array(tokenizer.encode(text).ids[:40])
    word_of = words.word_ids(ids)
    spans = {tuple(tokenizer.decode(ids[word_of == w].tolist()).strip().split()) for w in range(word_of[-1] + 1)}
    assert ("default_value",) in spans and ("self",) in spans and ("other_name",) in spans
    task = MaskedLM(vocab_size=tokenizer.get_vocab_size(), seed=0, mask_prob=0.3, words=words)
    rows = torch.from_numpy(np.stack([ids] * 50))
    labels = task.make_batch(rows, np.arange(50))["labels"][:, 1:-1]
    chosen = labels != IGNORE_INDEX
    assert (chosen.sum(dim=1) <= round(0.3 * 40)).all() and chosen.sum() > 0.8 * 50 * round(0.3 * 40)
    for row in chosen:
        for word in range(word_of[-1] + 1):
            in_word = row[torch.from_numpy(word_of == word)]
            assert in_word.all() or not in_word.any()  # a word is predicted whole or not at all
