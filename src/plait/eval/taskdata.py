"""plait's own eval tasks' data, written locally from the held-out split (no download).

One jsonl file per task, the rows the task's YAML (``plait/eval/tasks``) reads. Everything is a
deterministic function of the held-out documents and the tokenizer, so every rank writes the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from plait.data.heldout import Function, HeldOut, held_out_functions
from plait.data.shards import document_hash
from plait.data.tokenizer import atomic_path


@dataclass(frozen=True)
class TaskSizes:
    """How many samples each task draws (next_token: positions; code: functions, all when fewer)."""

    next_token: int = 256
    code_choice: int = 2048
    code_line: int = 64
    num_choices: int = 4
    pool_distractors: int = 15  # code choice: distractors scored per function; num_choices - 1 drawn from them
    context_tokens: int = 127  # the next-token task's context, at most

    def __post_init__(self) -> None:
        if min(self.next_token, self.code_choice, self.code_line, self.context_tokens) < 1 or self.num_choices < 2:
            raise ValueError(f"TaskSizes {self}: every count must be >= 1 and num_choices >= 2")
        if self.pool_distractors < self.num_choices - 1:
            raise ValueError(
                f"TaskSizes pool_distractors={self.pool_distractors}: the pool must hold the num_choices - 1 = "
                f"{self.num_choices - 1} distractors a draw takes; raise it"
            )


def write_task_data(part: HeldOut, tokenizer: Tokenizer, directory: Path, *, sizes: TaskSizes) -> dict[str, Path]:
    """Write ``<task>.jsonl`` for plait's four tasks under ``directory``; return their paths by task."""
    directory.mkdir(parents=True, exist_ok=True)
    # every function, documented or not: the demo's 18 held-out files hold 57 documented ones and 463 in all,
    # and a 4-way accuracy over 57 has a standard error of ~0.057, too wide to tell checkpoints apart
    functions = held_out_functions(part, documented_only=False)
    rows = {
        "plait_perplexity": [{"text": text} for text in part.documents],
        "plait_next_token": next_token_rows(part.documents, tokenizer, sizes=sizes),
        "plait_code_choice": choice_rows(
            functions[: sizes.code_choice], pool=functions, tokenizer=tokenizer, sizes=sizes
        ),
        "plait_code_line": [{"prompt": f.header, "target": first_line(f)} for f in functions[: sizes.code_line]],
    }
    paths = {}
    for task, task_rows in rows.items():
        if not task_rows:
            raise ValueError(f"the held-out split yields no samples for {task}; hold out more (data.val_fraction)")
        paths[task] = _write_jsonl(directory / f"{task}.jsonl", task_rows)
    return paths


def next_token_rows(documents: Iterable[str], tokenizer: Tokenizer, *, sizes: TaskSizes) -> list[dict[str, str]]:
    """Evenly spaced positions whose context and next token encode back to exactly those tokens."""
    encoded = [tokenizer.encode(text, add_special_tokens=False).ids for text in documents]
    total = sum(len(ids) for ids in encoded)
    stride = max(1, total // sizes.next_token)
    rows: list[dict[str, str]] = []
    for ids in encoded:
        for position in range(stride // 2 + 1, len(ids), stride):
            row = _exact_position(ids, position, tokenizer=tokenizer, context_tokens=sizes.context_tokens)
            if row is not None and len(rows) < sizes.next_token:
                rows.append(row)
    return rows


def _exact_position(ids: list[int], position: int, *, tokenizer: Tokenizer, context_tokens: int) -> dict | None:
    start = max(0, position - context_tokens)
    context = tokenizer.decode(ids[start:position])
    target = tokenizer.decode(ids[position : position + 1])
    encode = tokenizer.encode
    if encode(context, add_special_tokens=False).ids != ids[start:position]:
        return None
    if encode(context + target, add_special_tokens=False).ids != ids[start : position + 1]:
        return None
    return {"context": context, "target": target}


def choice_rows(
    functions: list[Function], *, pool: list[Function], tokenizer: Tokenizer, sizes: TaskSizes
) -> list[dict]:
    """The true body among ``num_choices - 1`` distractors, then the rest of its pool: the other bodies of
    ``pool`` nearest it in tokens, ``sizes.pool_distractors`` of them (fewer when the pool is smaller).

    The first ``num_choices`` choices are the single draw (the nearest ``num_choices - 1``, the true body at
    ``label``); ``single_draw`` says how many, for plait.eval.choice_pool. Equal token counts keep a summed
    log-likelihood from favouring the shorter choice. Ties are broken by a hash of the (true body, candidate)
    pair, a fresh draw per row: a hash of the candidate alone gave every row of one length the same few
    distractors (245 of the demo's 463 bodies filled all 1,389 slots, one of them 19 times), so a handful
    of bodies swayed every score together."""
    num_tokens = {f.body: len(tokenizer.encode(f.body, add_special_tokens=False).ids) for f in pool}
    drawn = sizes.num_choices - 1
    rows = []
    for function in functions:
        length = num_tokens[function.body]
        others = sorted(
            (f for f in pool if f.body != function.body),
            key=lambda f: (abs(num_tokens[f.body] - length), document_hash(function.body + "\0" + f.body)),
        )
        distractors = [f.body for f in others[: sizes.pool_distractors]]
        if len(distractors) < drawn:
            continue
        label = document_hash(function.header + function.body) % sizes.num_choices
        choices = [*distractors[:label], function.body, *distractors[label:]]
        rows.append(
            {
                "name": function.name,
                "prompt": function.header,
                "choices": choices,
                "label": label,
                "single_draw": sizes.num_choices,
            }
        )
    return rows


def first_line(function: Function) -> str:
    return function.body.split("\n", 1)[0]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
