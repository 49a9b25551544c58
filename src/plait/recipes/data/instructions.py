"""Instruction data for supervised fine-tuning: conversations, templates, and rows of tokens.

An example is a conversation (system/user/assistant turns). Rendered through a template, each turn becomes
text; only the assistant's tokens are trained (every other label is -100), so the loss is the response loss.
Several examples pack into one row with position ids that restart at 0 for each, which plait's models read
as document boundaries (`plait.models.layers.document_causal_mask`): no example attends to another.

Templates: ``plain`` (``### Instruction:`` / ``### Response:``, the assistant's turn closed by the end-of-text
token), ``chat`` (the tokenizer's own chat template), ``none`` (prompt and response joined as they are: for a
code model, a function's header then its body), ``auto`` (chat where the tokenizer has a template, else plain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.data.heldout import HeldOut, held_out, held_out_functions, training_functions
from plait.recipes.base import BaseTokenizer

IGNORE = -100  # labels the causal loss skips
ROLES = ("system", "user", "assistant")
PLAIN_PROMPT = "### Instruction:\n{content}\n\n### Response:\n"
PLAIN_SYSTEM = "{content}\n\n"


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Example:
    turns: tuple[Turn, ...]

    @staticmethod
    def pair(prompt: str, response: str) -> Example:
        return Example((Turn("user", prompt), Turn("assistant", response)))


@dataclass(frozen=True)
class Tokens:
    """One rendered example: its ids and labels (IGNORE outside the assistant's turns)."""

    ids: list[int]
    labels: list[int]

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def corpus_examples(corpus: str, *, val_fraction: float, held: bool, part: HeldOut | None = None) -> list[Example]:
    """Docstring -> body pairs of `corpus`: from its training documents, or (`held`) its validation documents,
    split as `plait train` and `plait eval` split them."""
    part = part or held_out(corpus, val_fraction=val_fraction)
    functions = held_out_functions(part) if held else training_functions(part)
    return [Example.pair(function.header, function.body) for function in functions]


def resolve_template(template: str, tokenizer: BaseTokenizer) -> str:
    """`auto` as chat or plain; `chat` with a tokenizer that has none is one ValueError line."""
    if template == "auto":
        return "chat" if tokenizer.has_chat_template else "plain"
    if template == "chat" and not tokenizer.has_chat_template:
        tokenizer.chat([])  # raises: no chat template
    return template


def _plain_segments(example: Example) -> list[tuple[str, bool]]:
    segments = []
    for turn in example.turns:
        if turn.role == "assistant":
            segments.append((turn.content, True))
        else:
            form = PLAIN_SYSTEM if turn.role == "system" else PLAIN_PROMPT
            segments.append((form.format(content=turn.content), False))
    return segments


def _chat_segments(example: Example, tokenizer: BaseTokenizer) -> list[tuple[str, bool]]:
    """Each turn's text as the chat template adds it (the difference between successive renders)."""
    messages = [{"role": turn.role, "content": turn.content} for turn in example.turns]
    segments, before = [], ""
    for index, turn in enumerate(example.turns):
        answer_next = index + 1 < len(messages) and messages[index + 1]["role"] == "assistant"
        text = tokenizer.chat(messages[: index + 1], add_generation_prompt=answer_next)
        if not text.startswith(before):
            raise ValueError(
                "the tokenizer's chat template renders earlier turns differently once later ones follow, so the "
                'prompt cannot be masked turn by turn; use data.template = "plain"'
            )
        segments.append((text[len(before) :], turn.role == "assistant"))
        before = text
    return segments


def render(example: Example, tokenizer: BaseTokenizer, *, template: str) -> Tokens:
    """The example's ids and labels under `template` (already resolved: plain | chat | none)."""
    if template == "chat":
        segments = _chat_segments(example, tokenizer)
    elif template == "plain":
        segments = _plain_segments(example)
    else:
        segments = [(turn.content, turn.role == "assistant") for turn in example.turns]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer.encode(text)
        if trained and template != "chat":
            piece.append(tokenizer.eot_id)  # the response ends: the model learns to stop
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    return Tokens(ids=ids, labels=labels)


def _truncated(tokens: Tokens, seq_len: int) -> Tokens:
    return Tokens(ids=tokens.ids[:seq_len], labels=tokens.labels[:seq_len])


def pack(examples: list[Tokens], *, seq_len: int, pack: bool) -> list[list[Tokens]]:
    """Rows of whole examples, in order, each row at most `seq_len` tokens (longer examples truncated; those
    left with nothing to train dropped). Without `pack`, one example per row."""
    rows: list[list[Tokens]] = []
    used = seq_len
    for tokens in examples:
        tokens = _truncated(tokens, seq_len)
        if tokens.num_trained == 0:
            continue
        if not pack or used + len(tokens.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(tokens)
        used += len(tokens.ids)
    return rows


def row_tensors(row: list[Tokens], *, seq_len: int, pad_id: int) -> tuple[list[int], list[int], list[int]]:
    """ids, labels and positions of one row, right-padded to `seq_len` (padding: its own segment, untrained)."""
    ids, labels, positions = [], [], []
    for tokens in row:
        ids += tokens.ids
        labels += tokens.labels
        positions += range(len(tokens.ids))
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, positions + list(range(pad))


def collate(rows: list[list[Tokens]], *, seq_len: int, pad_id: int, positions: bool = True) -> dict[str, torch.Tensor]:
    """A batch in the Hugging Face convention; `position_ids` (plait's models: per-example attention) when asked."""
    columns = [row_tensors(row, seq_len=seq_len, pad_id=pad_id) for row in rows]
    batch = {
        "input_ids": torch.tensor([c[0] for c in columns]),
        "labels": torch.tensor([c[1] for c in columns]),
    }
    if positions:
        batch["position_ids"] = torch.tensor([c[2] for c in columns])
    else:
        lengths = torch.tensor([sum(len(t.ids) for t in row) for row in rows])
        batch["attention_mask"] = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return batch
