"""Readers of instruction data in the common jsonl formats (one JSON object per line).

Alpaca-style: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional, joined to the
instruction by a blank line). ShareGPT-style: ``{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``. Field names come from [data] (data.instruction_field, ...). A file
whose records lack the configured fields is refused in one line naming how many and the first bad line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from plait.recipes.config import FinetuneDataConfig
from plait.recipes.data.instructions import Example, Turn

# ShareGPT's speakers (and the OpenAI-style names some files use) -> a role
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class _BadRecord(Exception):
    """A record that does not have what the format needs; `reason` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every non-blank line; invalid JSON is one ValueError line."""
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not JSON ({err.msg}); write one JSON object per line") from None


def _text(record: Any, key: str, *, required: bool = True) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise _BadRecord(f"no text under {key!r}")
    return value


def alpaca_example(record: Any, data: FinetuneDataConfig) -> Example:
    instruction = _text(record, data.instruction_field)
    extra = _text(record, data.input_field, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example.pair(prompt, _text(record, data.output_field))


def sharegpt_example(record: Any, data: FinetuneDataConfig) -> Example:
    turns = record.get(data.conversations_field) if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(f"no list of turns under {data.conversations_field!r}")
    converted = []
    for turn in turns:
        speaker = _text(turn, data.role_field)
        if speaker not in SPEAKERS:
            raise _BadRecord(f"a turn's {data.role_field!r} is {speaker!r}, not one of {', '.join(SPEAKERS)}")
        converted.append(Turn(SPEAKERS[speaker], _text(turn, data.content_field)))
    if not any(turn.role == "assistant" for turn in converted):
        raise _BadRecord("no assistant (gpt) turn to train on")
    return Example(tuple(converted))


READERS: dict[str, Callable[[Any, FinetuneDataConfig], Example]] = {
    "alpaca": alpaca_example,
    "sharegpt": sharegpt_example,
}


def read_examples(data: FinetuneDataConfig) -> list[Example]:
    """Every record of data.path in data.format; records that lack the configured fields refused in one line."""
    reader = READERS[data.format]
    examples, bad, first = [], 0, ""
    for number, record in json_lines(data.path):
        try:
            examples.append(reader(record, data))
        except _BadRecord as err:
            bad += 1
            first = first or f"line {number}: {err.reason}"
    if bad:
        raise ValueError(
            f"data.path={data.path}: {bad} of {bad + len(examples)} records lack the {data.format} fields "
            f"(first at {first}); name the record's keys with data.*_field or fix the file"
        )
    if not examples:
        raise ValueError(f"data.path={data.path} holds no records; write one JSON object per line")
    return examples


def hold_out_last(records: list, *, data: Any, noun: str) -> tuple[list, list]:
    """(training, held-out) of a jsonl's records: the last `data.eval_examples` held out, refused in one line
    when none would be left to train on."""
    if len(records) <= data.eval_examples:
        raise ValueError(
            f"data.path={data.path} has {len(records)} {noun} and data.eval_examples={data.eval_examples} of them "
            "are held out, leaving none to train on; lower data.eval_examples"
        )
    cut = len(records) - data.eval_examples
    return records[:cut], records[cut:]
