"""The run's cleaning counts, folded in one file at a time so memory does not grow with the file count.

Each worker returns one small dict per file (`clean.empty_stats`); the main process adds it here
and drops it. Only what the report shows is kept: sums, a dense length histogram, the first few
example names per filter and the first named bad files (all bad files are still counted by reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plait.data.prepare.clean import LENGTH_BINS

MAX_NAMED_BAD_FILES = 200
MAX_EXAMPLES = 5


@dataclass
class CleanTotals:
    files: int = 0
    bytes: int = 0
    docs_in: int = 0
    chars_in: int = 0
    chars_kept: int = 0
    emails: int = 0
    keys: int = 0
    scrubbed_docs: int = 0
    num_bad: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    bad_named: list[dict[str, str]] = field(default_factory=list)  # the first MAX_NAMED_BAD_FILES, in file order
    dropped: dict[str, list[int]] = field(default_factory=dict)  # filter -> [documents, characters]
    examples: dict[str, list[str]] = field(default_factory=dict)  # filter -> the first MAX_EXAMPLES names
    hist_in: list[int] = field(default_factory=lambda: [0] * (len(LENGTH_BINS) - 1))

    def add(self, stats: dict[str, Any]) -> None:
        """Fold in one file's counts (files are added in the run's file order)."""
        self.files += 1
        for name in ("bytes", "docs_in", "chars_in", "chars_kept", "emails", "keys", "scrubbed_docs"):
            setattr(self, name, getattr(self, name) + stats[name])
        if stats["bad"]:
            self.num_bad += 1
            reason = stats["bad"].split(" (")[0]
            self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + 1
            if len(self.bad_named) < MAX_NAMED_BAD_FILES:
                self.bad_named.append({"name": stats["name"], "reason": stats["bad"]})
        for name, (docs, chars) in stats["dropped"].items():
            count = self.dropped.setdefault(name, [0, 0])
            count[0] += docs
            count[1] += chars
        for name, names in stats["examples"].items():
            kept = self.examples.setdefault(name, [])
            kept.extend(names[: MAX_EXAMPLES - len(kept)])
        for key, count in stats["hist_in"].items():
            self.hist_in[int(key)] += count

    def removed(self, name: str) -> tuple[int, int]:
        docs, chars = self.dropped.get(name, [0, 0])
        return docs, chars
