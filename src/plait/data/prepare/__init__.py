"""`plait data prepare`: clean, deduplicate and tokenize a corpus into the shards `plait train` reads.

Example::

    from plait.data.prepare import prepare_corpus, load_rules

    report = prepare_corpus(["stdlib", "my_texts/"], "data/clean", config=load_rules("rules.toml"))
    # train on it: [data] corpus = "data/clean"

The names load on first use: near-duplicate removal needs the optional ``datasketch``
(``pip install 'plait[data]'``), which ``plait --help`` and training must not.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prepare_corpus": "plait.data.prepare.pipeline",
    "load_rules": "plait.data.prepare.rules",
    "PrepareConfig": "plait.data.prepare.rules",
    "FilterRules": "plait.data.prepare.rules",
    "DedupRules": "plait.data.prepare.rules",
    "ScrubRules": "plait.data.prepare.rules",
    "TokenizerRules": "plait.data.prepare.rules",
    "is_prepared": "plait.data.prepare.output",
    "load_prepared": "plait.data.prepare.output",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
