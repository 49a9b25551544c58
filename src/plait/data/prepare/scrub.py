"""Replace e-mail addresses and key-like strings with placeholders, counting them."""

from __future__ import annotations

import re

from plait.data.prepare.rules import ScrubRules

EMAIL_PLACEHOLDER = "<EMAIL>"
KEY_PLACEHOLDER = "<KEY>"

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Vendor key formats (AWS, OpenAI-style, GitHub, Slack, Google), and a long token assigned to a key-ish name.
_KEY = re.compile(
    r"\b(AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35})\b"
)
# A long quoted token right after a key-ish name and = or : ("api_key = '...'"). The quoted token is
# searched first (the name alternation, case-insensitive, is slow to scan a whole file with).
_QUOTED_TOKEN = re.compile(r"(['\"])([A-Za-z0-9_\-+/=]{16,})\1")
_KEY_NAME = re.compile(
    r"(api[_-]?key|secret|access[_-]?token|auth[_-]?token|password|passwd)\w*['\"]?\s*[:=]\s*$", re.IGNORECASE
)
_NAME_WINDOW = 60


def scrub(text: str, rules: ScrubRules) -> tuple[str, int, int]:
    """``(text, num_emails, num_keys)`` with each e-mail address and key replaced by its placeholder.

    >>> scrub("mail bob@example.com, key='AKIAABCDEFGHIJKLMNOP'", ScrubRules())
    ("mail <EMAIL>, key='<KEY>'", 1, 1)
    """
    num_emails = num_keys = 0
    if rules.emails and "@" in text:
        text, num_emails = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    if rules.keys:
        text, num_vendor = _KEY.subn(KEY_PLACEHOLDER, text)
        text, num_assigned = _scrub_assigned(text)
        num_keys = num_vendor + num_assigned
    return text, num_emails, num_keys


def _scrub_assigned(text: str) -> tuple[str, int]:
    count = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal count
        if not _KEY_NAME.search(text, max(0, match.start() - _NAME_WINDOW), match.start()):
            return match.group(0)
        count += 1
        return f"{match.group(1)}{KEY_PLACEHOLDER}{match.group(1)}"

    return _QUOTED_TOKEN.sub(replace, text), count
