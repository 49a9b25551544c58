"""Preference pairs: from the default corpus (a true function body preferred to a corrupted one) or a jsonl.

Corpus pairs: the prompt is a function's header (decorators, signature, docstring; an undocumented
function's, with documented_only=False, its signature alone), the chosen response its true body (the first lines, as `plait.data.heldout` cuts them), the rejected one
the same body corrupted in a way that keeps it plausible code:

- ``swap``: two adjacent one-line statements of the same indentation exchanged (neither opens a block
  nor leaves a bracket open, so the result parses where the body did);
- ``operator``: one comparison, arithmetic or boolean operator flipped, or one integer constant or
  True/False changed (``==`` -> ``!=``, ``<`` -> ``>=``, ``+`` -> ``-``, ``and`` -> ``or``, ``0`` -> ``1``, ...);
- ``other``: the body of another function of the same split with the same number of lines, drawn at
  random among the 2 x OTHER_NEAR nearest in length (so no one body is the rejected response of many pairs).

Training pairs come from training documents only, held-out pairs from validation documents only
(the split `plait eval` uses). Jsonl pairs: `read_preference_jsonl`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.data.heldout import Function, HeldOut, held_out, held_out_functions, training_functions
from plait.losses import IGNORE_INDEX
from plait.recipes.data.corruptions import (  # noqa: F401  (re-exported: the pairs' corruptions)
    CORRUPTIONS,
    OTHER_NEAR,
    BodyPool,
    corrupt,
    flip_operator,
    other_body,
    swap_lines,
)


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two responses, ``chosen`` preferred; ``kind`` says how the pair was made, ``line`` where
    it was read (1-based; 0 for corpus pairs)."""

    prompt: str
    chosen: str
    rejected: str
    kind: str = ""
    line: int = 0


def function_pairs(functions: Sequence[Function], *, per_function: int = 1, seed: int = 0) -> list[PreferencePair]:
    """Up to ``per_function`` pairs per function, each with a different corruption drawn at random.

    >>> f = Function(name="f", header="def f(x):\\n    \\"\\"\\"Add one.\\"\\"\\"\\n", body="    y = x + 1\\n    return y\\n")
    >>> sorted(p.kind for p in function_pairs([f], per_function=3))  # no other function: no 'other'
    ['operator', 'swap']
    """
    if not 1 <= per_function <= len(CORRUPTIONS):
        raise ValueError(f"per_function={per_function}: choose 1..{len(CORRUPTIONS)} corruptions per function")
    rng = random.Random(seed)
    pool = BodyPool(functions)
    pairs = []
    for function in functions:
        kinds = rng.sample(CORRUPTIONS, len(CORRUPTIONS))
        made = 0
        for kind in kinds:
            rejected = corrupt(function, kind, pool=pool, rng=rng)
            if rejected is not None:
                pairs.append(PreferencePair(function.header, function.body, rejected, kind=kind))
                made += 1
            if made == per_function:
                break
    return pairs


def corpus_pairs(
    corpus: str = "stdlib",
    *,
    split: str,
    val_fraction: float = 0.01,
    per_function: int = 1,
    seed: int = 0,
    part: HeldOut | None = None,
    documented_only: bool = True,
) -> list[PreferencePair]:
    """Preference pairs from ``corpus``: ``split="train"`` from training documents, ``"heldout"`` from validation
    documents (the recorded split `plait eval` reads; ``part``: that split, already read).

    ``documented_only=False`` takes every function of the split, an undocumented one prompted by its signature
    alone (~8x the pairs); the default keeps documented ones (signature and docstring)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: use 'train' (training documents) or 'heldout' (validation documents)")
    part = part if part is not None else held_out(corpus, val_fraction=val_fraction)
    if split == "train":
        functions = training_functions(part, documented_only=documented_only)
    else:
        functions = held_out_functions(part, documented_only=documented_only)
    return function_pairs(functions, per_function=per_function, seed=seed)


def split_training_functions(
    part: HeldOut, *, dev_fraction: float, seed: int = 0, documented_only: bool = True
) -> tuple[list[Function], list[Function]]:
    """Functions of the training documents (documented ones, or every one: see `training_functions`) in two
    disjoint parts, (train, dev): dev from a seeded ``dev_fraction`` of the training documents, train from the
    rest less any body dev has. Settings are chosen on dev, so the validation documents stay unseen until the
    final measurement."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction={dev_fraction}: give a share of the training documents in (0, 1)")
    documents = part.train_text.split("\0")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    dev_ids = set(order[: max(1, round(dev_fraction * len(documents)))])
    dev_text = "\0".join(documents[i] for i in sorted(dev_ids))
    rest_text = "\0".join(documents[i] for i in range(len(documents)) if i not in dev_ids)
    dev, rest = (
        training_functions(
            HeldOut(documents=part.documents, train_text=text, split=part.split), documented_only=documented_only
        )
        for text in (dev_text, rest_text)
    )
    dev_bodies = {function.body for function in dev}
    return [function for function in rest if function.body not in dev_bodies], dev


@dataclass(frozen=True)
class PairFields:
    """The jsonl field names of a preference record. ``prompt=""``: chosen and rejected hold the prompt too
    (Anthropic-HH style), split at their longest common prefix, cut back to a whitespace."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    def needed(self) -> tuple[str, ...]:
        return tuple(name for name in (self.prompt, self.chosen, self.rejected) if name)


def read_preference_jsonl(path: str | Path, *, fields: PairFields = PairFields()) -> list[PreferencePair]:
    """Preference pairs from a jsonl file, one record a line (blank lines skipped).

    Refused in one line, before anything runs: a line that is not a JSON object, records lacking a configured
    field or holding a non-string there (count and first bad line), pairs whose chosen and rejected responses
    are identical (count and first line). When the prompt is given and both responses start with it, it is
    stripped from them (the variant where chosen/rejected repeat the prompt).
    """
    path = Path(path)
    records = list(_records(path))
    if not records:
        raise ValueError(f"{path}: no records; give a jsonl with one {{{', '.join(fields.needed())}}} object a line")
    bad = [(line, record) for line, record in records if not _has_fields(record, fields)]
    if bad:
        line, record = bad[0]
        raise ValueError(
            f"{path}: {len(bad)} of {len(records)} records lack string fields {list(fields.needed())} "
            f"(first: line {line}, keys {sorted(record)}); set data.prompt_field/chosen_field/rejected_field to the "
            'records\' names (prompt_field = "" when chosen and rejected include the prompt)'
        )
    pairs = [_pair(record, fields, line=line) for line, record in records]
    check_distinct(pairs, source=str(path))
    return pairs


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg}); one JSON object a line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {number} is a {type(record).__name__}, not a JSON object")
            yield number, record


def _has_fields(record: dict, fields: PairFields) -> bool:
    return all(isinstance(record.get(name), str) for name in fields.needed())


def _pair(record: dict, fields: PairFields, *, line: int) -> PreferencePair:
    chosen, rejected = record[fields.chosen], record[fields.rejected]
    if not fields.prompt:
        prompt = _common_prefix(chosen, rejected)
    else:
        prompt = record[fields.prompt]
        if not (prompt and chosen.startswith(prompt) and rejected.startswith(prompt)):
            return PreferencePair(prompt, chosen, rejected, line=line)
    return PreferencePair(prompt, chosen[len(prompt) :], rejected[len(prompt) :], line=line)


def _common_prefix(first: str, second: str) -> str:
    """The longest common prefix, cut back to end at a whitespace so neither response starts mid-word."""
    size = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        size += 1
    if size < min(len(first), len(second)):
        while size and not first[size - 1].isspace():
            size -= 1
    return first[:size]


def check_distinct(pairs: Sequence[PreferencePair], *, source: str) -> None:
    """Refuse pairs whose chosen and rejected responses are identical (they teach nothing): count and first line."""
    same = [pair for pair in pairs if pair.chosen == pair.rejected]
    if same:
        first = f"line {same[0].line}" if same[0].line else f"prompt {same[0].prompt[:40]!r}"
        raise ValueError(
            f"{source}: {len(same)} of {len(pairs)} preference pairs have identical chosen and rejected "
            f"(first: {first}); drop them: a pair must say which response is preferred"
        )


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, *, seq_len: int) -> dict[str, torch.Tensor]:
    """Pairs as a batch, chosen at row 2i and rejected at 2i+1, right-padded with the tokenizer's end of text.

    ``labels`` are the response tokens (-100 on the prompt and padding). A prompt keeps its last
    ``seq_len // 2`` tokens, so every response keeps at least half the sequence; longer responses are cut.
    ``tokenizer`` has ``encode(text) -> list[int]`` and ``eot_id`` (`plait.recipes.base.BaseTokenizer`).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a preference sequence needs room for a prompt and a response (>= 2)")
    rows = [
        _row(tokenizer.encode(pair.prompt), tokenizer.encode(response), seq_len=seq_len)
        for pair in pairs
        for response in (pair.chosen, pair.rejected)
    ]
    input_ids = torch.full((len(rows), seq_len), tokenizer.eot_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for index, (ids, num_prompt) in enumerate(rows):
        input_ids[index, : len(ids)] = torch.tensor(ids)
        labels[index, num_prompt : len(ids)] = torch.tensor(ids[num_prompt:])
        attention_mask[index, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _row(prompt: list[int], response: list[int], *, seq_len: int) -> tuple[list[int], int]:
    prompt = prompt[-(seq_len // 2) :] if prompt else []
    return (prompt + response)[:seq_len], len(prompt)


def trim_padding(batch: dict[str, torch.Tensor], *, multiple_of: int = 16) -> dict[str, torch.Tensor]:
    """``batch`` cut after its longest row's last real token (rounded up to ``multiple_of`` columns, so sequence
    and context parallel still split it): causal attention makes the trailing padding dead weight."""
    longest = int(batch["attention_mask"].sum(dim=1).max())
    width = min(batch["input_ids"].size(1), -(-longest // multiple_of) * multiple_of)
    return {key: value[:, :width] if value.dim() == 2 else value for key, value in batch.items()}
