"""The held-out split that evaluation reads: validation documents, and the functions inside them.

`plait.data.shards` sends a document to validation by its content hash (the ``k`` smallest of
``blake2b-64`` hashes, ``k = round(val_fraction x documents)``), so training never sees a
validation document. The code-completion task takes its functions from those documents only,
and drops any whose body also occurs verbatim in a training document (code copied between
files), so no held-out body was trained on. `split_record` names this rule and its version;
the data cache's ``meta.json`` carries it and `plait eval` checks it.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

from plait.data.corpus import Corpus, iter_documents
from plait.data.shards import document_hash, val_threshold

# Bump when which documents or functions are held out changes.
SPLIT_VERSION = 1
SPLIT_RULE = "document: blake2b-64 of its text, the round(val_fraction x N) smallest held out; function: in a held-out document, body never in a training document"
_MAX_BODY_LINES = 4
_MAX_HEADER_CHARS = 800
_MAX_BODY_CHARS = 300


def split_record(*, val_fraction: float, threshold: int | None) -> dict[str, object]:
    """What the data cache records about its split, for `plait eval` to check."""
    return {"version": SPLIT_VERSION, "rule": SPLIT_RULE, "val_fraction": val_fraction, "val_threshold": threshold}


@dataclass(frozen=True)
class HeldOut:
    """The validation documents of a corpus and the training text beside them (for the leak guard)."""

    documents: tuple[str, ...]
    train_text: str
    split: dict[str, object]


def held_out(corpus: Corpus, *, val_fraction: float, threshold: int | None = None) -> HeldOut:
    """Split ``corpus`` as the shards were split (``threshold`` from the cache's record, else recomputed).

    >>> part = held_out("stdlib", val_fraction=0.01)
    >>> len(part.documents) > 0
    True
    """
    if val_fraction == 0.0:
        raise ValueError(
            "the run kept no validation split (data.val_fraction=0): nothing is held out to evaluate on; "
            "train with data.val_fraction > 0"
        )
    if threshold is None:
        threshold = val_threshold(corpus, val_fraction)
    documents, train = [], []
    for text in iter_documents(corpus):
        (documents if document_hash(text) <= threshold else train).append(text)
    split = split_record(val_fraction=val_fraction, threshold=threshold)
    return HeldOut(documents=tuple(documents), train_text="\0".join(train), split=split)


@dataclass(frozen=True)
class Function:
    """A held-out function: ``header`` (decorators, signature, docstring) and the first lines of its body."""

    name: str
    header: str
    body: str


def held_out_functions(part: HeldOut, *, documented_only: bool = True) -> list[Function]:
    """Functions of the held-out documents whose body no training document contains, in order: those with
    a docstring (the header is signature and docstring), or with ``documented_only=False`` every function
    with a body below its signature line (an undocumented one's header is its signature alone)."""
    seen: set[str] = set()
    functions = []
    for text in part.documents:
        for function in _functions(text, documented_only=documented_only):
            if function.body in seen or function.body.strip() in part.train_text:
                continue
            seen.add(function.body)
            functions.append(function)
    return functions


def training_functions(part: HeldOut, *, documented_only: bool = True) -> list[Function]:
    """Documented functions of the training documents (fine-tuning pairs; never a held-out body), in order;
    with ``documented_only=False`` every function, an undocumented one's header its signature alone (as
    `held_out_functions` makes them), and no body of any held-out function."""
    held = {function.body for text in part.documents for function in _functions(text, documented_only=documented_only)}
    seen: set[str] = set()
    functions = []
    for text in part.train_text.split("\0"):
        for function in _functions(text, documented_only=documented_only):
            if function.body not in seen and function.body not in held:
                seen.add(function.body)
                functions.append(function)
    return functions


def _functions(text: str, *, documented_only: bool) -> Iterator[Function]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # Python 2 test data and deliberate syntax errors in the stdlib
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            documented = bool(ast.get_docstring(node))
            if documented or not documented_only:
                function = _split(node, lines, documented=documented)
                if function is not None:
                    yield function


def _split(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], *, documented: bool) -> Function | None:
    # the header ends with the docstring, or (undocumented) on the line before the first statement
    header_end = node.body[0].end_lineno if documented else node.body[0].lineno - 1
    if len(node.body) < 1 + documented or header_end is None or header_end < node.lineno or node.end_lineno is None:
        return None
    segment = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    header_lines = header_end - node.lineno + 1
    seg_lines = segment.splitlines()
    body = [line for line in seg_lines[header_lines:] if line.strip()][:_MAX_BODY_LINES]
    header = "\n".join(seg_lines[:header_lines]) + "\n"
    body_text = "\n".join(body) + "\n"
    if not body or len(header) > _MAX_HEADER_CHARS or len(body_text) > _MAX_BODY_CHARS:
        return None
    return Function(name=node.name, header=header, body=body_text)
