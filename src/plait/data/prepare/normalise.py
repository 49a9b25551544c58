"""Text normalisation: Unicode NFC, one newline convention, no byte-order mark."""

from __future__ import annotations

import unicodedata


def normalise(text: str) -> str:
    """NFC, ``\\r\\n`` and ``\\r`` as ``\\n``, a leading BOM dropped.

    >>> normalise("\\ufeffcafe\\u0301\\r\\nx\\r")
    'café\\nx\\n'
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)
