"""Verifiable tasks for GRPO/PPO: functions of the corpus that carry doctests, to be completed and run.

A task is a module-level function whose docstring holds doctest examples (``>>>``). Its prompt is the
module's top-level imports, the signature and the docstring; the completion is the body; the reward runs
prompt + completion with the docstring's examples in `plait.recipes.sandbox`. Tasks come from training
documents (``split="train"``) or validation documents (``split="heldout"``), the split `plait eval` uses.
``verified=True`` keeps only the tasks whose true body passes its own doctests in the sandbox (many
stdlib doctests need module state the task does not carry).

On the stdlib at val_fraction 0.01: 104 such functions in training documents, 0 in validation documents.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from plait.data.corpus import Corpus
from plait.data.heldout import HeldOut, held_out
from plait.recipes.sandbox import SandboxLimits, graded_reward, run_sandboxed

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class VerifiableTask:
    name: str
    prompt: str  # imports + signature + docstring, ending in a newline
    body: str  # the true body (indented)

    def program(self, completion: str) -> str:
        return self.prompt + completion


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
        if len(imports) + len(header) <= max_prompt_chars:
            tasks.append(VerifiableTask(name=node.name, prompt=imports + header, body=body))
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
