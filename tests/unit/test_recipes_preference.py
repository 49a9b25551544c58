"""Preference recipes without a process group: the reward, DPO and SimPO losses against their formulas written
out directly, the reward model's last-token score, corpus pairs and their corruptions, the pair encoding, and
the jsonl reader with its refusals."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import plait
from plait.data.heldout import Function, HeldOut
from plait.recipes.data.preferences import (
    PairFields,
    PreferencePair,
    corpus_pairs,
    encode_pairs,
    flip_operator,
    function_pairs,
    read_preference_jsonl,
    swap_lines,
    trim_padding,
)
from plait.recipes.dpo import DPOLoss, SimPOLoss, implicit_reward_accuracy, sequence_logps, with_reference_logps
from plait.recipes.preference_run import PreferenceData
from plait.recipes.reward import RewardModel, last_token_index, pairwise_loss

VOCAB = 11


def pair_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two pairs (4 rows of 6 tokens): responses of different lengths, the prompt and padding at -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (4, 6), generator=gen)
    labels = input_ids.clone()
    labels[:, :2] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    labels[2, 4:] = -100
    return {"input_ids": input_ids, "labels": labels}


def direct_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_t log softmax(logits[t])[labels[t + 1]] over labelled t + 1, one row at a time."""
    out = []
    for row in range(labels.size(0)):
        total = torch.zeros(())
        for t in range(labels.size(1) - 1):
            if labels[row, t + 1] != -100:
                total = total + torch.log_softmax(logits[row, t], -1)[labels[row, t + 1]]
        out.append(total)
    return torch.stack(out)


def test_sequence_logps_match_the_direct_sum() -> None:
    batch = pair_batch()
    logits = torch.randn(4, 6, VOCAB, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sequence_logps(logits, batch["labels"]), direct_logps(logits, batch["labels"]))


def test_dpo_loss_matches_the_formula() -> None:
    batch = pair_batch()
    logits = torch.randn(4, 6, VOCAB, generator=torch.Generator().manual_seed(2))
    ref = torch.tensor([-9.0, -7.5, -8.0, -6.0])
    beta = 0.3
    pi = direct_logps(logits, batch["labels"])
    z = beta * ((pi[0::2] - ref[0::2]) - (pi[1::2] - ref[1::2]))
    loss_sum, pairs = DPOLoss(beta=beta)(logits, {**batch, "ref_logps": ref})
    torch.testing.assert_close(loss_sum, -F.logsigmoid(z).sum())
    assert pairs.item() == 2 and DPOLoss.count_tokens(batch).item() == 2
    smoothed, _ = DPOLoss(beta=beta, label_smoothing=0.1)(logits, {**batch, "ref_logps": ref})
    torch.testing.assert_close(smoothed, (-0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).sum())


def test_simpo_loss_matches_the_formula() -> None:
    batch = pair_batch()
    logits = torch.randn(4, 6, VOCAB, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([4.0, 3.0, 2.0, 4.0])  # labelled tokens after the shift
    average = direct_logps(logits, batch["labels"]) / lengths
    z = 2.0 * (average[0::2] - average[1::2]) - 0.5
    loss_sum, _ = SimPOLoss(beta=2.0, gamma=0.5)(logits, batch)
    torch.testing.assert_close(loss_sum, -F.logsigmoid(z).sum())


def test_pairwise_loss_and_odd_rows() -> None:
    scores = torch.tensor([1.0, -1.0, 0.5, 2.0])
    loss_sum, pairs = pairwise_loss(scores, {"input_ids": torch.zeros(4, 3)})
    torch.testing.assert_close(loss_sum, -F.logsigmoid(torch.tensor([2.0, -1.5])).sum())
    assert pairs.item() == 2
    with pytest.raises(ValueError, match="even number of rows"):
        pairwise_loss(scores[:3], {"input_ids": torch.zeros(3, 3)})


def test_bad_loss_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        SimPOLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="with_reference_logps"):
        DPOLoss()(torch.zeros(2, 6, VOCAB), pair_batch())


def test_reward_model_scores_the_last_real_token() -> None:
    torch.manual_seed(0)
    lm = plait.models.build("tiny", max_seq_len=8)
    model = RewardModel(lm).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    assert last_token_index(ids, mask).tolist() == [7, 4]
    scores = model.score(ids, mask)
    alone = model.score(ids[1:, :5], mask[1:, :5])  # causal: padding on the right changes nothing
    torch.testing.assert_close(scores[1:], alone)
    assert scores.shape == (2,)


def test_dpo_accuracy_is_one_half_at_the_reference() -> None:
    torch.manual_seed(0)
    policy = plait.models.build("tiny", max_seq_len=6)
    batch = with_reference_logps(policy, pair_batch())
    summary = implicit_reward_accuracy(policy, [batch], beta=0.1)
    assert summary["accuracy"] == 0.5 and summary["pairs"] == 2


FUNCTION = Function(
    name="f", header='def f(x):\n    """Add one."""\n', body="    y = x + 1\n    z = y * 2\n    return z == 4\n"
)


def test_corruptions_keep_the_code_plausible() -> None:
    rng = random.Random(0)
    assert swap_lines("    y = x + 1\n    z = y * 2\n", rng) == "    z = y * 2\n    y = x + 1\n"
    assert swap_lines("    if x:\n        y = 1\n", rng) is None  # different indentation: no swap
    assert swap_lines("    for a in b:\n    y = 1\n", rng) is None  # the first opens a block
    flipped = flip_operator(FUNCTION.body, rng)
    assert flipped != FUNCTION.body and flipped.count("\n") == 3
    assert flip_operator("    return f(x=-1)\n", rng) == "    return f(x=-2)\n"  # keyword and unary minus kept


def test_function_pairs_use_each_corruption_once() -> None:
    other = Function(name="g", header="def g():\n", body="    a = 1\n    b = 2\n    return a\n")
    pairs = function_pairs([FUNCTION, other], per_function=3, seed=0)
    kinds = [pair.kind for pair in pairs if pair.prompt == FUNCTION.header]
    assert sorted(kinds) == ["operator", "other", "swap"]
    assert all(pair.chosen != pair.rejected for pair in pairs)
    assert next(p for p in pairs if p.kind == "other" and p.prompt == FUNCTION.header).rejected == other.body


class Chars:
    """A tokenizer of one id per character (BaseTokenizer's interface: encode, eot_id)."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 50 + 1 for c in text]


def test_encode_pairs_interleaves_and_masks_the_prompt() -> None:
    pairs = [PreferencePair("abcdef", "XY", "Z"), PreferencePair("p", "long response", "r")]
    batch = encode_pairs(pairs, Chars(), seq_len=8)
    assert batch["input_ids"].shape == (4, 8)
    labels, mask = batch["labels"], batch["attention_mask"]
    # prompt cut to its last 4 tokens (seq_len // 2): "cdef", then the response
    assert (labels[0] != -100).sum() == 2 and (labels[1] != -100).sum() == 1 and mask[0].sum() == 6
    assert labels[0, :4].eq(-100).all() and labels[0, 4:6].tolist() == Chars().encode("XY")
    assert mask[2].sum() == 8 and (labels[2] != -100).sum() == 7  # "p" + the response cut at seq_len
    short = encode_pairs([PreferencePair("ab", "c", "de")], Chars(), seq_len=40)
    trimmed = trim_padding(short, multiple_of=8)
    assert trimmed["input_ids"].shape == (2, 8) and torch.equal(trimmed["labels"], short["labels"][:, :8])


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def test_jsonl_reader_and_the_prompt_inside_variant(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q: hi\n", "chosen": "hello", "rejected": "go away"}])
    assert read_preference_jsonl(plain)[0] == PreferencePair("Q: hi\n", "hello", "go away", line=1)
    joined = [{"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: help"}]
    pair = read_preference_jsonl(write_jsonl(tmp_path / "b.jsonl", joined), fields=PairFields(prompt=""))[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Human: hi Assistant: ", "hello there", "help")
    repeated = [{"q": "Q ", "good": "Q yes", "bad": "Q no"}]
    fields = PairFields(prompt="q", chosen="good", rejected="bad")
    pair = read_preference_jsonl(write_jsonl(tmp_path / "c.jsonl", repeated), fields=fields)[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q ", "yes", "no")


def test_jsonl_refusals_name_the_count_and_first_line(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    lacking = write_jsonl(tmp_path / "lack.jsonl", [good, {"prompt": "p", "chosen": "a"}, good, {"prompt": "p"}])
    with pytest.raises(ValueError, match=r"2 of 4 records lack .* line 2"):
        read_preference_jsonl(lacking)
    same = write_jsonl(tmp_path / "same.jsonl", [good, {**good, "rejected": "a"}, {**good, "rejected": "a"}])
    with pytest.raises(ValueError, match=r"2 of 3 preference pairs have identical chosen and rejected \(first: line 2"):
        read_preference_jsonl(same)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_preference_jsonl(broken)


HELD_DOCUMENT = '''
def documented(x):
    """Add one."""
    y = x + 1
    return y


def undocumented(a, b):
    c = a * b
    d = c - 2
    return d
'''


def test_heldout_pairs_may_take_every_validation_function() -> None:
    part = HeldOut(documents=(HELD_DOCUMENT,), train_text="", split={})
    documented = corpus_pairs(split="heldout", per_function=3, part=part)
    every = corpus_pairs(split="heldout", per_function=3, part=part, documented_only=False)
    assert {pair.prompt.splitlines()[0] for pair in documented} == {"def documented(x):"}
    assert {pair.prompt.splitlines()[0] for pair in every} == {"def documented(x):", "def undocumented(a, b):"}


def test_preference_tokens_per_step_counts_real_tokens_only() -> None:
    pairs = [PreferencePair("abcdef", "XY", "Z"), PreferencePair("p", "long response", "r")] * 2
    data = PreferenceData(pairs, [], Chars(), seq_len=8)
    counts = data.recipe_data(global_batch=4).tokens_per_step
    step0 = data.step_pairs(0, num_pairs=2)
    expected = sum(min(8, min(len(p.prompt), 4) + len(r)) for p in step0 for r in (p.chosen, p.rejected))
    assert callable(counts) and counts(0) == expected < 4 * 8
    assert [counts(step) for step in range(4)] == [data.step_tokens(step, global_batch=4) for step in range(4)]
