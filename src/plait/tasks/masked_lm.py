"""Masked-LM (BERT) and masked-LM with sentence-order prediction (ALBERT) on the text corpus.

A sample is `[CLS] tokens [SEP]` (ALBERT: `[CLS] A [SEP] B [SEP]`, the row cut in two halves that
swap with probability 1/2). Of the tokens between the special ones, exactly
`max(1, round(mask_prob * n))` are chosen (as BERT's own data pipeline does: a fixed number per
sequence; with whole-word masking, BERT only, whole words up to that number), and of those 80% become
[MASK], 10% a random corpus token and 10% stay; labels hold the original token at the chosen positions
and -100 elsewhere. The special tokens follow the corpus tokenizer's vocabulary (ids vocab_size,
vocab_size + 1, ...), so the token shards stay as they are.

    task = MaskedLM(vocab_size=8192, seed=0)
    batch = task.make_batch(rows, positions)  # input_ids (n, len + 2), labels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from plait.data.special_tokens import BertTokens
from plait.losses import IGNORE_INDEX
from plait.tasks.text import Batch, sample_rng
from plait.tasks.token_loss import masked_lm_with_sentence_order, token_cross_entropy

MASK_STREAM = 1  # sample_rng streams: each task's choices are independent of the others'
ORDER_STREAM = 2


def num_to_mask(num_tokens: int, mask_prob: float) -> int:
    return max(1, round(mask_prob * num_tokens))


@dataclass(frozen=True)
class WordEdges:
    """Per token id of a byte-level BPE vocabulary: whether it starts / ends with a word character
    (ASCII letter, digit, underscore). A token continues the word before it when it starts with one
    and the token before it ends with one (`default_value` is `Ġdefault`, `_`, `value`: one word)."""

    starts: np.ndarray  # (vocab,) bool
    ends: np.ndarray  # (vocab,) bool

    @classmethod
    def of(cls, tokenizer: Any) -> WordEdges:
        size = tokenizer.get_vocab_size()
        strings = [tokenizer.id_to_token(i) or "" for i in range(size)]
        return cls(
            starts=np.array([bool(text) and _is_word_char(text[0]) for text in strings]),
            ends=np.array([bool(text) and _is_word_char(text[-1]) for text in strings]),
        )

    def word_ids(self, tokens: np.ndarray) -> np.ndarray:
        """(n,) the index of the word each token belongs to."""
        continues = np.zeros(len(tokens), dtype=bool)
        continues[1:] = self.starts[tokens[1:]] & self.ends[tokens[:-1]]
        return np.cumsum(~continues) - 1


def _is_word_char(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "_")


def choose_positions(
    tokens: np.ndarray, rng: np.random.Generator, *, count: int, words: WordEdges | None
) -> np.ndarray:
    """`count` positions of `tokens` to predict: at random, or (whole-word masking) whole words in random
    order, skipping a word that would overshoot, as BERT's whole-word recipe does (then fewer may be chosen)."""
    if words is None:
        return rng.choice(len(tokens), size=count, replace=False)
    word_of = words.word_ids(tokens)
    chosen: list[int] = []
    for word in rng.permutation(word_of[-1] + 1):
        positions = np.flatnonzero(word_of == word)
        if len(chosen) + len(positions) <= count:
            chosen += positions.tolist()
    return np.array(chosen, dtype=np.int64)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_prob: float,
    tokens_of: BertTokens,
    words: WordEdges | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one sequence's maskable `tokens` (n,): 80/10/10 over a fixed number of positions
    (at most that many with whole-word masking, `words`)."""
    chosen = choose_positions(tokens, rng, count=num_to_mask(len(tokens), mask_prob), words=words)
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[chosen] = tokens[chosen]
    inputs = tokens.copy()
    action = rng.random(len(chosen))
    random_ids = rng.integers(0, tokens_of.vocab_size, size=len(chosen))
    inputs[chosen] = np.where(action < 0.8, tokens_of.mask, np.where(action < 0.9, random_ids, tokens[chosen]))
    return inputs, labels


class MaskedLM:
    """BERT's masked-LM task: `[CLS] row [SEP]`, 15% of the row masked 80/10/10."""

    kind = "masked_lm"
    loss_fn = token_cross_entropy

    def __init__(self, *, vocab_size: int, seed: int, mask_prob: float = 0.15, words: WordEdges | None = None) -> None:
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob={mask_prob}: give the fraction of tokens to predict, e.g. 0.15")
        self.tokens = BertTokens(vocab_size)
        self.seed = seed
        self.mask_prob = mask_prob
        self.words = words  # given: whole-word masking

    def sample_tokens(self, seq_len: int) -> int:
        if seq_len < 3:
            raise ValueError(f"seq_len={seq_len}: a masked-LM sample is [CLS] tokens [SEP]; use seq_len >= 3")
        return seq_len - 2

    def make_batch(self, rows: torch.Tensor, positions: np.ndarray) -> Batch:
        inputs, labels = [], []
        for row, position in zip(rows.numpy(), positions, strict=True):
            rng = sample_rng(MASK_STREAM, self.seed, position)
            masked, targets = mask_tokens(row, rng, mask_prob=self.mask_prob, tokens_of=self.tokens, words=self.words)
            inputs.append(np.concatenate([[self.tokens.cls], masked, [self.tokens.sep]]))
            labels.append(np.concatenate([[IGNORE_INDEX], targets, [IGNORE_INDEX]]))
        return {"input_ids": torch.from_numpy(np.stack(inputs)), "labels": torch.from_numpy(np.stack(labels))}


class SentenceOrderMLM(MaskedLM):
    """ALBERT's pre-training task: `[CLS] A [SEP] B [SEP]` with A, B the two halves of the row, swapped
    with probability 1/2 (`sentence_order_label` 1 when swapped), and A and B masked as BERT masks."""

    kind = "masked_lm_sop"
    loss_fn = masked_lm_with_sentence_order

    def __init__(self, *, vocab_size: int, seed: int, mask_prob: float = 0.15) -> None:
        # no whole-word masking: its loss needs the same number of masked tokens in every sequence
        super().__init__(vocab_size=vocab_size, seed=seed, mask_prob=mask_prob)

    def sample_tokens(self, seq_len: int) -> int:
        if seq_len < 5:
            raise ValueError(f"seq_len={seq_len}: a sentence-order sample is [CLS] A [SEP] B [SEP]; use seq_len >= 5")
        return seq_len - 3

    def make_batch(self, rows: torch.Tensor, positions: np.ndarray) -> Batch:
        inputs, labels, types, orders = [], [], [], []
        tokens = self.tokens
        for row, position in zip(rows.numpy(), positions, strict=True):
            first, second = row[: len(row) // 2], row[len(row) // 2 :]
            swapped = sample_rng(ORDER_STREAM, self.seed, position).random() < 0.5
            first, second = (second, first) if swapped else (first, second)
            masked, targets = mask_tokens(
                np.concatenate([first, second]),
                sample_rng(MASK_STREAM, self.seed, position),
                mask_prob=self.mask_prob,
                tokens_of=tokens,
            )
            cut = len(first)
            inputs.append(np.concatenate([[tokens.cls], masked[:cut], [tokens.sep], masked[cut:], [tokens.sep]]))
            labels.append(
                np.concatenate([[IGNORE_INDEX], targets[:cut], [IGNORE_INDEX], targets[cut:], [IGNORE_INDEX]])
            )
            types.append(np.concatenate([np.zeros(cut + 2, dtype=np.int64), np.ones(len(second) + 1, dtype=np.int64)]))
            orders.append(int(swapped))
        return {
            "input_ids": torch.from_numpy(np.stack(inputs)),
            "token_type_ids": torch.from_numpy(np.stack(types)),
            "labels": torch.from_numpy(np.stack(labels)),
            "sentence_order_label": torch.tensor(orders),
        }
