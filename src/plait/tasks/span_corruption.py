"""T5's span corruption on the text corpus (Raffel et al. 2020, section 3.1.4).

Of a row of n tokens, round(noise_density x n) are noise, in round(noise / mean_span) spans (at least
one); span lengths and the gaps between them are random segmentations (T5's `random_spans_noise_mask`),
and the row starts with a kept gap. The encoder reads the kept tokens with one sentinel in place of
each span, then </s>; the decoder predicts each sentinel followed by its span, then </s>. Lengths are
fixed by n alone, so batches are rectangular without padding. Special tokens follow the corpus
vocabulary: <pad> (also the decoder's start token), </s>, then the sentinels <extra_id_0>, ...

    task = SpanCorruption(vocab_size=8192, seed=0)
    batch = task.make_batch(rows, positions)  # input_ids, decoder_input_ids, labels
"""

from __future__ import annotations

import numpy as np
import torch

from plait.data.special_tokens import NUM_SENTINELS, T5Tokens
from plait.tasks.text import Batch, sample_rng
from plait.tasks.token_loss import token_cross_entropy

SPAN_STREAM = 3


def span_counts(num_tokens: int, *, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) of a row of `num_tokens`: at least one of each, and at least one kept token."""
    num_noise = min(max(1, round(num_tokens * noise_density)), num_tokens - 1)
    return num_noise, max(1, round(num_noise / mean_span))


def random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`parts` positive lengths summing to `total`, uniformly over the ways to cut."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [total]]))


class SpanCorruption:
    """T5's pre-training task: encoder input with sentinels, decoder targets of the spans."""

    kind = "span_corruption"
    loss_fn = token_cross_entropy

    def __init__(self, *, vocab_size: int, seed: int, noise_density: float = 0.15, mean_span: float = 3.0) -> None:
        if not 0 < noise_density < 1 or mean_span < 1:
            raise ValueError(
                f"noise_density={noise_density}, mean_span={mean_span}: use a density in (0, 1) (T5: 0.15) and "
                "a mean span length >= 1 (T5: 3)"
            )
        self.tokens = T5Tokens(vocab_size)
        self.seed = seed
        self.noise_density = noise_density
        self.mean_span = mean_span

    def sample_tokens(self, seq_len: int) -> int:
        num_noise, num_spans = span_counts(seq_len, noise_density=self.noise_density, mean_span=self.mean_span)
        if num_spans > NUM_SENTINELS or seq_len - num_noise < num_spans:
            raise ValueError(
                f"seq_len={seq_len} with noise_density={self.noise_density}, mean_span={self.mean_span} makes "
                f"{num_spans} spans; at most {NUM_SENTINELS} fit the sentinels, and each needs a kept token before "
                "it: lower seq_len or raise mean_span"
            )
        return seq_len

    def corrupt(self, row: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(encoder input, decoder labels) of one row."""
        num_noise, num_spans = span_counts(len(row), noise_density=self.noise_density, mean_span=self.mean_span)
        noise = random_segmentation(num_noise, num_spans, rng)
        kept = random_segmentation(len(row) - num_noise, num_spans, rng)
        inputs, targets, start = [], [], 0
        for index, (keep, span) in enumerate(zip(kept, noise, strict=True)):
            sentinel = self.tokens.sentinel(index)
            inputs += [row[start : start + keep], [sentinel]]
            targets += [[sentinel], row[start + keep : start + keep + span]]
            start += keep + span
        eos = [self.tokens.eos]
        return np.concatenate([*inputs, eos]), np.concatenate([*targets, eos])

    def make_batch(self, rows: torch.Tensor, positions: np.ndarray) -> Batch:
        pairs = [
            self.corrupt(row, sample_rng(SPAN_STREAM, self.seed, p))
            for row, p in zip(rows.numpy(), positions, strict=True)
        ]
        labels = torch.from_numpy(np.stack([target for _, target in pairs]))
        start = labels.new_full((labels.shape[0], 1), self.tokens.pad)  # T5's decoder starts from <pad>
        return {
            "input_ids": torch.from_numpy(np.stack([inputs for inputs, _ in pairs])),
            "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),
            "labels": labels,
        }
