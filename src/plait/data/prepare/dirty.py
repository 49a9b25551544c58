"""A deliberately dirty corpus with a ground truth, for tests and benchmarks/data_prepare.py.

From a list of original documents it writes the originals plus planted problems: exact copies,
near duplicates (a share of the identifiers renamed, a share of lines added and of lines
reordered), binary, empty and huge files, low-quality files (repeated lines, symbols, license
text, a generated header) and a file holding an e-mail address and an API key. ``truth.json``
beside the corpus (not inside it) names every planted file, and its original for the copies.
"""

from __future__ import annotations

import json
import keyword
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plait.data.prepare.filters import first_failure
from plait.data.prepare.normalise import normalise
from plait.data.prepare.rules import FilterRules

_IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_RESERVED = set(keyword.kwlist) | set(keyword.softkwlist) | {"self", "cls", "True", "False", "None"}
SECRET_EMAIL = "jane.doe@example.com"
SECRET_KEY = "AKIA" + "Q7XW2ZK4M9TRB3YD"  # the AWS access-key shape, made up
LICENSE_TEXT = """Copyright (c) 2024 Example Authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software,
to deal in the Software without restriction, including without limitation the rights to use,
copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE.
"""


@dataclass(frozen=True)
class DirtyPlan:
    """How many of each planted kind to write."""

    num_exact: int = 20
    num_near: int = 20
    num_binary: int = 3
    num_empty: int = 3
    num_huge: int = 1
    huge_bytes: int = 40 << 20
    rename_fraction: float = 0.1
    line_fraction: float = 0.05
    seed: int = 0


def mutate(text: str, rng: random.Random, *, rename_fraction: float, line_fraction: float) -> str:
    """Rename ``rename_fraction`` of the distinct identifiers, add and reorder ``line_fraction`` of the lines."""
    names = sorted(set(_IDENTIFIER.findall(text)) - _RESERVED)
    chosen = rng.sample(names, k=round(rename_fraction * len(names)))
    mapping = {name: f"{name}_{rng.randrange(16**4):04x}" for name in chosen}
    text = _IDENTIFIER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)
    lines = text.split("\n")
    num_lines = max(1, round(line_fraction * len(lines)))
    for _ in range(num_lines):
        lines.insert(rng.randrange(len(lines) + 1), f"# note {rng.randrange(10**6)}: {rng.choice(names or ['x'])}")
    moved = rng.sample(range(len(lines)), k=min(num_lines, len(lines)))
    shuffled = rng.sample(moved, k=len(moved))
    original = list(lines)
    for source, target in zip(moved, shuffled, strict=True):
        lines[target] = original[source]
    return "\n".join(lines)


def write_dirty_corpus(
    documents: Sequence[tuple[str, str]], out: str | Path, plan: DirtyPlan | None = None
) -> dict[str, Any]:
    """Write ``out/corpus/`` (originals + planted files) and ``out/truth.json``; return the truth."""
    plan = plan or DirtyPlan()
    rng = random.Random(plan.seed)
    corpus = Path(out) / "corpus"
    truth: dict[str, Any] = {"originals": [], "exact": [], "near": [], "binary": [], "empty": [], "huge": []}
    for name, text in documents:
        _write(corpus / "orig" / name, text)
        truth["originals"].append(f"corpus/orig/{name}")
    # Copies are made of documents the quality filters keep, so that dedup, not a filter, must find them.
    eligible = [i for i, (_, text) in enumerate(documents) if first_failure(normalise(text), FilterRules()) is None]
    picks = rng.sample(eligible, k=min(len(eligible), plan.num_exact + plan.num_near))
    for i, index in enumerate(picks):
        name, text = documents[index]
        kind = "exact" if i < plan.num_exact else "near"
        if kind == "near":
            text = mutate(text, rng, rename_fraction=plan.rename_fraction, line_fraction=plan.line_fraction)
        copy = f"{kind}/{i:04d}_{Path(name).name}"
        _write(corpus / copy, text)
        truth[kind].append({"copy": f"corpus/{copy}", "original": f"corpus/orig/{name}"})
    _plant_bad_files(corpus, plan=plan, rng=rng, truth=truth)
    _plant_low_quality(corpus, truth=truth)
    (Path(out) / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return truth


def _plant_bad_files(corpus: Path, *, plan: DirtyPlan, rng: random.Random, truth: dict[str, Any]) -> None:
    for i in range(plan.num_binary):
        path = corpus / "bad" / f"blob_{i}.bin"
        _write_bytes(path, bytes(rng.randrange(256) for _ in range(4096)) + b"\0")
        truth["binary"].append(f"corpus/bad/{path.name}")
    for i in range(plan.num_empty):
        _write(corpus / "bad" / f"empty_{i}.py", "" if i % 2 == 0 else "\n  \n")
        truth["empty"].append(f"corpus/bad/empty_{i}.py")
    for i in range(plan.num_huge):
        path = corpus / "bad" / f"huge_{i}.txt"
        line = "x = 1  # a line repeated into a file too large to read\n"
        _write(path, line * (plan.huge_bytes // len(line) + 1))
        truth["huge"].append(f"corpus/bad/{path.name}")


def _plant_low_quality(corpus: Path, *, truth: dict[str, Any]) -> None:
    planted = {
        "repeated_lines": ("junk/repeated.py", "print('hello')\n" * 200),
        "alnum_fraction": ("junk/symbols.txt", "=+-*/ <> {} [] ;; ** ~~ ^^ %% !! ?? @@ ## && || \\\\\n" * 40),
        "license": ("junk/LICENSE.txt", LICENSE_TEXT),
        "generated": (
            "junk/generated.py",
            "# Auto-generated by tools/make_tables.py. DO NOT EDIT.\n"
            + "TABLE = {\n"
            + "".join(f"    {i}: {i * i},\n" for i in range(200))
            + "}\n",
        ),
    }
    for kind, (name, text) in planted.items():
        _write(corpus / name, text)
        truth[kind] = [f"corpus/{name}"]
    secret = (
        '"""Settings for the uploader."""\n\n'
        f'MAINTAINER = "Jane Doe <{SECRET_EMAIL}>"\n'
        f'AWS_ACCESS_KEY_ID = "{SECRET_KEY}"\n'
        'api_key = "sk-' + "4f9a" * 8 + '"\n\n'
        "def upload(path):\n    return post(path, key=api_key)\n"
    )
    _write(corpus / "secrets" / "settings.py", secret)
    truth["secrets"] = {"file": "corpus/secrets/settings.py", "emails": 1, "keys": 2}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
