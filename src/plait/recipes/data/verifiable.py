"""Verifiable tasks for GRPO/PPO: functions of the corpus that carry doctests, to be completed and run.

A task is a module-level function whose docstring holds doctest examples (``>>>``). Its prompt is the
signature and the docstring; the completion is the body; the reward runs the module's top-level imports +
prompt + completion with the docstring's examples in `plait.recipes.sandbox`. Tasks come from training
documents (``split="train"``) or validation documents (``split="heldout"``), the split `plait eval` uses.
`verified` keeps only the tasks whose true body passes its own doctests in the sandbox (many
stdlib doctests need module state the task does not carry).

On the stdlib at val_fraction 0.01: 99 such functions in training documents (38 pass their own doctests
in the sandbox), 0 in validation documents.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from plait.data.corpus import Corpus, corpus_fingerprint
from plait.data.heldout import HeldOut, held_out
from plait.recipes.sandbox import SandboxLimits, graded_reward, run_sandboxed

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class VerifiableTask:
    name: str
    imports: str  # the module's top-level imports (run with the program, not shown to the model)
    prompt: str  # signature + docstring, ending in a newline: what the model completes
    body: str  # the true body (indented)

    def program(self, completion: str) -> str:
        return self.imports + self.prompt + completion


def _imports(tree: ast.Module, text: str) -> str:
    lines = [ast.get_source_segment(text, node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    return "".join(f"{line}\n" for line in lines if line and not line.startswith("from __future__"))


def _tasks_of(text: str, *, max_prompt_chars: int) -> list[VerifiableTask]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines, imports, tasks = text.splitlines(), None, []
    for node in tree.body:
        docstring = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
        if not docstring or ">>>" not in docstring or len(node.body) < 2 or node.decorator_list:
            continue
        imports = _imports(tree, text) if imports is None else imports
        header_end = node.body[0].end_lineno
        header = "\n".join(lines[node.lineno - 1 : header_end]) + "\n"
        body = "\n".join(lines[header_end : node.end_lineno]) + "\n"
        if len(header) <= max_prompt_chars:
            tasks.append(VerifiableTask(name=node.name, imports=imports, prompt=header, body=body))
    return tasks


def corpus_tasks(
    corpus: Corpus, *, split: str, val_fraction: float = 0.01, part: HeldOut | None = None, max_prompt_chars: int = 2000
) -> list[VerifiableTask]:
    """The doctest-carrying functions of the training or held-out documents, in order, bodies distinct."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    part = part or held_out(corpus, val_fraction=val_fraction)
    documents = part.train_text.split("\0") if split == "train" else part.documents
    seen, tasks = set(), []
    for text in documents:
        for task in _tasks_of(text, max_prompt_chars=max_prompt_chars):
            if task.body not in seen:
                seen.add(task.body)
                tasks.append(task)
    return tasks


def verified(tasks: list[VerifiableTask], *, limits: SandboxLimits | None = None) -> list[VerifiableTask]:
    """The tasks whose true body passes their own doctests in the sandbox."""
    return [
        task
        for task in tasks
        if run_sandboxed(task.program(task.body), entry=task.name, limits=limits or SandboxLimits()).passed
    ]


def score_completion(task: VerifiableTask, completion: str, *, limits: SandboxLimits | None = None) -> float:
    """The graded reward (`plait.recipes.sandbox.graded_reward`) of ``completion`` as ``task``'s body."""
    return graded_reward(run_sandboxed(task.program(completion), entry=task.name, limits=limits or SandboxLimits()))


def completion_body(text: str) -> str:
    """The completion cut where the function ends: before the first non-empty line that is not indented."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    return "".join(kept)


def verifiable_reward(
    tasks: list[VerifiableTask], tokenizer: Any, *, samples: int, limits: SandboxLimits | None = None
) -> Callable[[Any], torch.Tensor]:
    """A reward function for a rollout of ``tasks`` (``samples`` rows each, in order): the graded reward of
    each row's completion (its tokens up to the end token, decoded, cut where the function ends)."""

    def reward(sampled: Any) -> torch.Tensor:
        scores = []
        for row in range(sampled.input_ids.size(0)):
            ids = sampled.input_ids[row][sampled.completion_mask[row] > 0].tolist()
            text = tokenizer.decode([i for i in ids if i != tokenizer.eot_id])
            scores.append(score_completion(tasks[row // samples], completion_body(text), limits=limits))
        return torch.tensor(scores)

    return reward


CACHE_VERSION = 1  # bump when task extraction or the sandbox's verdict changes


def cached_verified_tasks(
    corpus: Corpus, *, split: str, val_fraction: float, limits: SandboxLimits, cache_dir: str | Path
) -> list[VerifiableTask]:
    """`verified(corpus_tasks(...))`, built once and kept under ``cache_dir/verifiable/`` keyed by the
    corpus's content, the split, the sandbox limits, this Python and CACHE_VERSION (verifying runs every
    true body in the sandbox: minutes on the stdlib). Written atomically, so ranks racing write the same file."""
    key = json.dumps(
        [corpus_fingerprint(corpus), split, val_fraction, dataclasses.asdict(limits), sys.version, CACHE_VERSION]
    )
    path = Path(cache_dir) / "verifiable" / f"{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.json"
    if path.is_file():
        return [VerifiableTask(**record) for record in json.loads(path.read_text())]
    tasks = verified(corpus_tasks(corpus, split=split, val_fraction=val_fraction), limits=limits)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps([dataclasses.asdict(task) for task in tasks]))
    os.replace(partial, path)
    return tasks
